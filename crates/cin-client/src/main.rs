//! `cin`: see `cin --help`.

fn main() {
    std::process::exit(cin_client::cli::main_from(std::env::args_os()));
}
