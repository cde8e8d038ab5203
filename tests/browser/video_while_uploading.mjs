#!/usr/bin/env node
// Plays a filelink in a <video> element of headless Chromium (playwright-core),
// the way a viewer would while the file still uploads.
//
// Usage: node video_while_uploading.mjs FILELINK [TIMEOUT_SECONDS]
// (CIN_TEST_CHROMIUM names the browser, /usr/bin/chromium by default).
//
// Prints one JSON line when the video element is about to open the filelink:
//   {"ready": true}
// one when the first frame is shown:
//   {"first_frame_at_ms": <Unix ms>}
// and one when playback ends:
//   {"ended": true, "current_time", "duration", "frames", "errors": [...]}
// On failure: the reason on stderr, exit 1.

import { chromium } from 'playwright-core'

const [filelink, timeoutArg] = process.argv.slice(2)
if (!filelink) {
  process.stderr.write('usage: video_while_uploading.mjs FILELINK [TIMEOUT_SECONDS]\n')
  process.exit(2)
}
const timeout = Number(timeoutArg || 120) * 1000
// A fresh profile: launch() makes a temporary one of its own.
const browser = await chromium.launch({
  executablePath: process.env.CIN_TEST_CHROMIUM || '/usr/bin/chromium',
  args: [
    '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
    '--autoplay-policy=no-user-gesture-required',
  ],
})
try {
  const page = await browser.newPage()
  const errors = []
  page.on('pageerror', (e) => errors.push(String(e)))
  await page.exposeFunction('reportReady', () => {
    process.stdout.write(JSON.stringify({ ready: true }) + '\n')
  })
  await page.exposeFunction('reportFirstFrame', (at) => {
    process.stdout.write(JSON.stringify({ first_frame_at_ms: at }) + '\n')
  })
  await page.setContent('<video id="v" muted playsinline autoplay></video>')
  const result = await page.evaluate(
    ([src, timeout]) =>
      new Promise(async (resolve, reject) => {
        const video = document.getElementById('v')
        let frames = 0
        let first = true
        const onFrame = () => {
          frames += 1
          if (first) {
            first = false
            window.reportFirstFrame(Math.round(performance.timeOrigin + performance.now()))
          }
          video.requestVideoFrameCallback(onFrame)
        }
        video.requestVideoFrameCallback(onFrame)
        video.addEventListener('ended', () =>
          resolve({ ended: true, current_time: video.currentTime, duration: video.duration, frames }),
        )
        video.addEventListener('error', () =>
          reject(new Error(`media error ${video.error && video.error.code}: ${video.error && video.error.message}`)),
        )
        setTimeout(() => reject(new Error(`not ended after ${timeout} ms (at ${video.currentTime} s of ${video.duration}, ${frames} frames)`)), timeout)
        await window.reportReady()
        video.src = src
      }),
    [filelink, timeout],
  )
  process.stdout.write(JSON.stringify({ ...result, errors }) + '\n')
} catch (e) {
  process.stderr.write(`video_while_uploading: ${e.message}\n`)
  process.exitCode = 1
} finally {
  await browser.close()
}
