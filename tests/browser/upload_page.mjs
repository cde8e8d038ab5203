#!/usr/bin/env node
// Uploads one file through the POP's own upload page (GET /) in headless
// Chromium, driven by playwright-core, the way a person would, with a reload
// in the middle.
//
// Usage:
//   node upload_page.mjs --base http://127.0.0.1:PORT --file PATH --screenshots DIR
//       [--query '?apikey=KEY'] [--throughput BYTES_PER_SECOND] [--reload-at FRACTION]
//       [--timeout SECONDS]
// (or CIN_PAGE_BASE, CIN_PAGE_FILE, CIN_PAGE_SCREENSHOTS; CIN_TEST_CHROMIUM names
// the browser, /usr/bin/chromium by default).
//
// What it does:
//   1. Opens BASE/QUERY with the upload throttled (CDP Network.emulateNetworkConditions,
//      uploadThroughput), picks the file with the page's file input, waits for
//      the filelink to appear and for the page to have sent FRACTION of the file,
//      and takes upload-page-mid.png.
//   2. Reloads the page mid-upload (the throttle is set again: a new document),
//      waits for the page to list the unfinished upload, takes
//      upload-page-reloaded.png, then focuses the drop zone, presses Enter and
//      picks the same file in the file chooser that opens.
//   3. Waits for the row to say it resumed and for its status to read Stored;
//      takes upload-page-done.png, then the same page at 375x740
//      (upload-page-mobile.png).
//
// Prints ONE line of JSON on stdout:
//   {"handle", "filelink", "size", "offset_before_reload", "restored_offset",
//    "resumed_from", "status", "status_history", "message", "picked_with_keyboard",
//    "mobile_scroll_width", "screenshots", "page_errors", "console_errors", "seconds"}
// On failure: the reason on stderr (with what the page showed), exit 1; bad
// arguments: exit 2.

import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'
import { chromium } from 'playwright-core'

const CHROMIUM_ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
]

function die(msg, code = 1) {
  process.stderr.write(`upload_page: ${msg}\n`, () => process.exit(code))
  setTimeout(() => process.exit(code), 1000).unref()
}

function parseArgs(argv) {
  const args = {
    base: process.env.CIN_PAGE_BASE,
    file: process.env.CIN_PAGE_FILE,
    screenshots: process.env.CIN_PAGE_SCREENSHOTS,
    query: '',
    throughput: 6 * 1024 * 1024,
    reloadAt: 0.35,
    timeout: 240,
  }
  for (let i = 0; i < argv.length; i++) {
    const flag = argv[i]
    const next = () => {
      if (i + 1 >= argv.length) die(`${flag} needs a value`, 2)
      return argv[++i]
    }
    switch (flag) {
      case '--base': args.base = next(); break
      case '--file': args.file = next(); break
      case '--screenshots': args.screenshots = next(); break
      case '--query': args.query = next(); break
      case '--throughput': args.throughput = Number(next()); break
      case '--reload-at': args.reloadAt = Number(next()); break
      case '--timeout': args.timeout = Number(next()); break
      default: die(`unknown argument ${flag}`, 2)
    }
  }
  if (!args.base || !args.file || !args.screenshots) {
    die('usage: node upload_page.mjs --base URL --file PATH --screenshots DIR [--query Q] [--throughput B/s] [--reload-at F] [--timeout S]', 2)
  }
  return args
}

const args = parseArgs(process.argv.slice(2))
const size = fs.statSync(args.file).size
const started = Date.now()
const waitMs = args.timeout * 1000
fs.mkdirSync(args.screenshots, { recursive: true })
const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'cin-page-profile-'))
const pageErrors = []
const consoleErrors = []
const screenshots = []
let page = null

const row = '[data-testid="upload"]'

/** What the page shows of its one upload row, for the report and for failures. */
async function rowState() {
  return page.evaluate((selector) => {
    const r = document.querySelector(selector)
    if (!r) return null
    const text = (id) => r.querySelector(`[data-testid="${id}"]`)?.textContent.trim() ?? null
    return {
      state: r.dataset.state,
      status: text('status'),
      offset: Number(r.dataset.offset),
      sent: Number(r.dataset.sent),
      handle: r.dataset.handle,
      resumed_from: r.dataset.resumedFrom === undefined ? null : Number(r.dataset.resumedFrom),
      status_history: (r.dataset.statusHistory || '').split(',').filter(Boolean),
      numbers: text('numbers'),
      message: r.querySelector('[data-testid="message"]')?.hidden ? null : text('message'),
      filelink: r.querySelector('[data-testid="filelink"]')?.value || null,
    }
  }, row)
}

/** Waits for `predicate` (run in the page) or fails naming `what`. */
async function waitFor(what, predicate, arg) {
  try {
    await page.waitForFunction(predicate, arg, { timeout: waitMs, polling: 100 })
  } catch (err) {
    const shown = await rowState().catch(() => null)
    throw new Error(`${what}: ${err.message.split('\n')[0]}; the page shows ${JSON.stringify(shown)}`)
  }
}

async function shot(name, options = {}) {
  const file = path.join(args.screenshots, `upload-page-${name}.png`)
  await page.screenshot({ path: file, ...options })
  screenshots.push(file)
}

async function main() {
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.CIN_TEST_CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: CHROMIUM_ARGS,
    viewport: { width: 1000, height: 860 },
    deviceScaleFactor: 1,
    colorScheme: 'light',
  })
  try {
    page = context.pages()[0] || (await context.newPage())
    page.on('pageerror', (err) => pageErrors.push(String(err)))
    page.on('console', (msg) => {
      if (msg.type() === 'error') consoleErrors.push(msg.text())
    })
    const cdp = await context.newCDPSession(page)
    // Slow enough that the upload takes seconds and a reload lands in the middle.
    const throttle = async () => {
      await cdp.send('Network.enable')
      await cdp.send('Network.emulateNetworkConditions', {
        offline: false,
        latency: 10,
        downloadThroughput: -1,
        uploadThroughput: args.throughput,
      })
    }

    await throttle()
    const base = args.base.replace(/\/$/, '')
    const answer = await page.goto(`${base}/${args.query}`, { waitUntil: 'load' })
    if (!answer || answer.status() !== 200) throw new Error(`GET / answered ${answer && answer.status()}`)

    // 1. Pick the file; the filelink is there before the bytes are.
    await page.setInputFiles('input[type="file"]', args.file)
    await waitFor(
      'the filelink never appeared',
      (selector) => /^https?:\/\//.test(document.querySelector(`${selector} [data-testid="filelink"]`)?.value || ''),
      row,
    )
    const early = await rowState()
    await waitFor(
      `the page never sent ${args.reloadAt} of the file with speed and time left`,
      ([selector, bytes]) => {
        const r = document.querySelector(selector)
        return r && Number(r.dataset.offset) >= bytes && /left/.test(r.textContent)
      },
      [row, Math.floor(size * args.reloadAt)],
    )
    await shot('mid')
    const beforeReload = await rowState()
    if (beforeReload.state === 'done') throw new Error('the upload finished before the reload: throttle it more')

    // 2. Reload mid-upload; the page lists the upload and waits for its file.
    await page.reload({ waitUntil: 'load' })
    await throttle()
    await waitFor(
      'after the reload the page did not list the unfinished upload',
      (selector) => {
        const r = document.querySelector(selector)
        return r && r.dataset.state === 'detached' && /pick or drop the same file to resume/i.test(r.textContent)
      },
      row,
    )
    const restored = await rowState()
    await shot('reloaded')

    // The drop zone is a keyboard control: Enter opens the file chooser. A key
    // pressed while the reloaded page is still settling can be lost, so a
    // chooser that does not open is asked for again.
    let chooser = null
    for (let attempt = 1; !chooser; attempt++) {
      await page.locator('[data-testid="drop"]').focus()
      try {
        ;[chooser] = await Promise.all([
          page.waitForEvent('filechooser', { timeout: 5000 }),
          page.keyboard.press('Enter'),
        ])
      } catch (err) {
        if (attempt >= 5) throw new Error(`Enter on the drop zone opened no file chooser in ${attempt} tries: ${err.message}`)
      }
    }
    await chooser.setFiles(args.file)

    // 3. It resumes from what the POP has and ends Stored.
    await waitFor(
      'the page did not resume the upload',
      (selector) => document.querySelector(selector)?.dataset.resumedFrom !== undefined,
      row,
    )
    await waitFor(
      'the status never read Stored',
      (selector) => document.querySelector(`${selector} [data-testid="status"]`)?.textContent.trim() === 'Stored',
      row,
    )
    const done = await rowState()
    // The focus ring of the drop zone (pressed above) would hide the row's look.
    await page.evaluate(() => document.activeElement && document.activeElement.blur())
    // Down to the end of the content, without the empty viewport below it.
    const bottom = await page.evaluate(() => Math.ceil(document.querySelector('main').getBoundingClientRect().bottom))
    await shot('done', { clip: { x: 0, y: 0, width: page.viewportSize().width, height: Math.min(bottom + 24, 860) } })

    await page.setViewportSize({ width: 375, height: 740 })
    const mobileScrollWidth = await page.evaluate(() => document.documentElement.scrollWidth)
    await shot('mobile', { fullPage: true })

    return {
      handle: done.handle,
      filelink: done.filelink,
      early_filelink: early.filelink,
      early_offset: early.offset,
      size,
      offset_before_reload: beforeReload.offset,
      numbers_before_reload: beforeReload.numbers,
      restored_offset: restored.offset,
      restored_message: restored.message,
      resumed_from: done.resumed_from,
      status: done.status,
      state: done.state,
      status_history: done.status_history,
      message: done.message,
      numbers: done.numbers,
      picked_with_keyboard: true,
      mobile_scroll_width: mobileScrollWidth,
      screenshots,
      page_errors: pageErrors,
      console_errors: consoleErrors,
      seconds: (Date.now() - started) / 1000,
    }
  } finally {
    await context.close().catch(() => {})
  }
}

const timer = setTimeout(() => die(`no result within ${args.timeout} s`), waitMs + 30000)
try {
  const report = await main()
  clearTimeout(timer)
  fs.rmSync(profile, { recursive: true, force: true })
  process.stdout.write(`${JSON.stringify(report)}\n`)
} catch (err) {
  fs.rmSync(profile, { recursive: true, force: true })
  die(`${err.stack || err}\npage errors: ${JSON.stringify(pageErrors)}\nconsole errors: ${JSON.stringify(consoleErrors)}`)
}
