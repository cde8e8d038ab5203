#!/usr/bin/env node
// Uploads a video through the POP's upload page (GET /) in headless Chromium on
// a throttled link, presses play on the page's preview while the upload goes
// on, and reports what played before the upload ended.
//
// Usage: node page_preview.mjs BASE_URL VIDEO_FILE SCREENSHOT_DIR [BYTES_PER_SECOND]
// (CIN_TEST_CHROMIUM names the browser, /usr/bin/chromium by default).
//
// Prints one line of JSON:
//   {"handle", "frames_while_uploading", "played_while_uploading",
//    "status_while_playing", "final_status", "ended", "current_time", "duration"}
// On failure: the reason on stderr, exit 1.

import path from 'node:path'
import { chromium } from 'playwright-core'

const [base, file, screenshots, rate] = process.argv.slice(2)
if (!base || !file || !screenshots) {
  process.stderr.write('usage: page_preview.mjs BASE_URL VIDEO_FILE SCREENSHOT_DIR [BYTES_PER_SECOND]\n')
  process.exit(2)
}
const row = '[data-testid="upload"]'
const timeout = 120_000

const browser = await chromium.launch({
  executablePath: process.env.CIN_TEST_CHROMIUM || '/usr/bin/chromium',
  args: [
    '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
  ],
})
try {
  const page = await browser.newPage({ viewport: { width: 1000, height: 860 } })
  const cdp = await page.context().newCDPSession(page)
  await cdp.send('Network.enable')
  // The upload is slow; the preview's download is not.
  await cdp.send('Network.emulateNetworkConditions', {
    offline: false,
    latency: 10,
    downloadThroughput: -1,
    uploadThroughput: Number(rate || 1_000_000),
  })
  await page.goto(`${base.replace(/\/$/, '')}/`, { waitUntil: 'load' })
  await page.setInputFiles('input[type="file"]', file)

  // The preview appears from the filelink while the file uploads; play it.
  const preview = page.locator(`${row} [data-testid="preview"]`)
  await preview.waitFor({ state: 'attached', timeout })
  const status = () => page.locator(`${row} [data-testid="status"]`).textContent()
  const watching = await page.evaluate(
    ([selector, timeout]) =>
      new Promise((resolve, reject) => {
        const video = document.querySelector(selector)
        const statusOf = () =>
          document.querySelector('[data-testid="upload"] [data-testid="status"]')?.textContent.trim()
        let frames = 0
        const t0 = performance.now()
        const log = []
        const note = (what) => log.push(`${Math.round(performance.now() - t0)}ms ${what} t=${video.currentTime.toFixed(2)} rs=${video.readyState} status=${statusOf()}`)
        for (const e of ['loadedmetadata', 'canplay', 'playing', 'waiting', 'stalled', 'progress']) video.addEventListener(e, () => note(e))
        note('start')
        const onFrame = () => {
          if (statusOf() !== 'Uploading') {
            reject(new Error(`the upload ended after ${frames} frames of the preview: ${log.join('; ')}`))
            return
          }
          frames += 1
          // Enough frames shown while uploading: the preview plays during the upload.
          if (frames >= 25) {
            resolve({ frames_while_uploading: frames, played_while_uploading: video.currentTime, status_while_playing: statusOf() })
            return
          }
          video.requestVideoFrameCallback(onFrame)
        }
        video.requestVideoFrameCallback(onFrame)
        video.addEventListener('error', () => reject(new Error(`preview media error ${video.error && video.error.code}`)))
        setTimeout(() => reject(new Error(`only ${frames} frames while uploading (status ${statusOf()}): ${log.join('; ')}`)), timeout)
        video.play().catch(reject)
      }),
    [`${row} [data-testid="preview"]`, timeout],
  )
  await page.screenshot({ path: path.join(screenshots, 'upload-page-preview.png') })

  // It plays to the end, and the upload finishes.
  const ended = await page.evaluate(
    ([selector, timeout]) =>
      new Promise((resolve, reject) => {
        const video = document.querySelector(selector)
        const done = () => resolve({ ended: true, current_time: video.currentTime, duration: video.duration })
        if (video.ended) done()
        video.addEventListener('ended', done)
        setTimeout(() => reject(new Error(`the preview did not end (at ${video.currentTime} of ${video.duration})`)), timeout)
      }),
    [`${row} [data-testid="preview"]`, timeout],
  )
  await page.waitForFunction(
    (selector) => document.querySelector(`${selector} [data-testid="status"]`)?.textContent.trim() === 'Stored',
    row,
    { timeout, polling: 100 },
  )
  const handle = await page.locator(row).getAttribute('data-handle')
  process.stdout.write(JSON.stringify({ handle, ...watching, ...ended, final_status: (await status()).trim() }) + '\n')
} catch (e) {
  process.stderr.write(`page_preview: ${e.message}\n`)
  process.exitCode = 1
} finally {
  await browser.close()
}
