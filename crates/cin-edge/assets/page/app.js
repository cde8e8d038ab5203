// The POP's upload page: tus 1.0 uploads with fetch, one file at a time, that
// survive lost connections and page reloads; status live from /{handle}/events.
'use strict'

;(() => {
  const TUS = { 'Tus-Resumable': '1.0.0' }
  const ENDPOINT = new URL('/files/', location.href).href
  const KIB = 1024
  const MAX_CHUNK = 1024 * KIB
  const MIN_CHUNK = 64 * KIB
  const FIRST_CHUNK = 256 * KIB
  // Seconds to wait after the 1st, 2nd, ... failure in a row (the last repeats).
  const BACKOFF = [1, 2, 4, 8, 15, 30]
  // A chunk should take about this long: small enough for the bar to move and
  // for a reload to lose little, large enough to keep requests few.
  const CHUNK_SECONDS = 1
  const FINAL = new Set(['Stored', 'Expired', 'Deleted'])
  // Browsers open at most 6 HTTP/1.1 connections to a host; each event stream
  // holds one, and the uploads need theirs.
  const MAX_STREAMS = 3
  const MAX_DONE_KEPT = 50
  const UNFINISHED_PREFIX = 'cin-edge.upload.'
  const DONE_PREFIX = 'cin-edge.done.'
  const STATUS_TEXT = {
    Uploading: 'The POP is receiving the file',
    InTransit: 'Complete on the POP, on its way to final storage; the filelink serves it',
    Stored: 'In final storage',
    Expired: 'The upload expired before it was finished',
    Deleted: 'The file was deleted',
  }

  const $ = (id) => document.getElementById(id)
  const list = $('list')
  const template = $('row-template')
  const input = $('files')
  const drop = $('drop')
  const config = readConfig()
  /** Every row, in the order shown (and uploaded). */
  const items = []
  let active = null
  let nextId = 1

  // ---------------------------------------------------------------- config

  function readConfig() {
    let base = {}
    try {
      base = JSON.parse($('cin-config').textContent) || {}
    } catch {
      base = {}
    }
    const query = new URLSearchParams(location.search)
    const out = {}
    for (const key of ['apikey', 'policy', 'signature']) {
      const value = query.has(key) ? query.get(key) : base[key]
      out[key] = typeof value === 'string' ? value.trim() : ''
    }
    return out
  }

  /** `?policy=&signature=` for reads of an app that requires security. */
  function readQuery() {
    if (!config.policy || !config.signature) return ''
    const q = new URLSearchParams({ policy: config.policy, signature: config.signature })
    return `?${q}`
  }

  function base64(text) {
    const bytes = new TextEncoder().encode(text)
    let binary = ''
    for (let i = 0; i < bytes.length; i += 0x8000) {
      binary += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000))
    }
    return btoa(binary)
  }

  function uploadMetadata(item) {
    const pairs = [['filename', item.name]]
    if (item.type) pairs.push(['filetype', item.type])
    for (const key of ['apikey', 'policy', 'signature']) {
      if (config[key]) pairs.push([key, config[key]])
    }
    return pairs.map(([k, v]) => `${k} ${base64(v)}`).join(',')
  }

  // --------------------------------------------------------------- storage

  function fingerprint(file) {
    return `${file.name}|${file.size}|${file.lastModified}`
  }

  function storageGet(key) {
    try {
      const value = JSON.parse(localStorage.getItem(key))
      return value && typeof value === 'object' ? value : null
    } catch {
      return null
    }
  }

  function storageSet(key, value) {
    try {
      localStorage.setItem(key, JSON.stringify(value))
    } catch {
      // Storage full or refused (private mode): the upload goes on, only a
      // reload could not resume it.
    }
  }

  function storageRemove(key) {
    try {
      localStorage.removeItem(key)
    } catch {
      // Nothing to do: see storageSet.
    }
  }

  function storedEntries() {
    const out = []
    let keys = []
    try {
      keys = Object.keys(localStorage)
    } catch {
      return out
    }
    for (const key of keys) {
      if (!key.startsWith(UNFINISHED_PREFIX) && !key.startsWith(DONE_PREFIX)) continue
      const entry = storageGet(key)
      if (entry && typeof entry.url === 'string' && typeof entry.name === 'string') out.push(entry)
    }
    return out.sort((a, b) => (a.created || 0) - (b.created || 0))
  }

  /** Unfinished uploads by file fingerprint; finished ones by upload URL, so
   * the same file can be uploaded again. */
  function persist(item) {
    if (!item.url) return
    const entry = {
      fp: item.fp,
      url: item.url,
      handle: item.handle,
      filelink: item.filelink,
      name: item.name,
      size: item.size,
      type: item.type,
      offset: item.offset,
      status: item.status,
      done: item.state === 'done',
      created: item.created,
    }
    if (entry.done) {
      const unfinished = storageGet(UNFINISHED_PREFIX + item.fp)
      if (unfinished && unfinished.url === item.url) storageRemove(UNFINISHED_PREFIX + item.fp)
      storageSet(DONE_PREFIX + item.url, entry)
      pruneDone()
    } else {
      storageSet(UNFINISHED_PREFIX + item.fp, entry)
    }
  }

  function forget(item) {
    if (!item.url) return
    const unfinished = storageGet(UNFINISHED_PREFIX + item.fp)
    if (unfinished && unfinished.url === item.url) storageRemove(UNFINISHED_PREFIX + item.fp)
    storageRemove(DONE_PREFIX + item.url)
  }

  function pruneDone() {
    const done = storedEntries().filter((e) => e.done)
    for (const entry of done.slice(0, Math.max(0, done.length - MAX_DONE_KEPT))) {
      storageRemove(DONE_PREFIX + entry.url)
    }
  }

  // ------------------------------------------------------------ formatting

  function bytes(n) {
    if (!Number.isFinite(n)) return '?'
    if (n < 1000) return `${n} B`
    const units = ['kB', 'MB', 'GB', 'TB']
    let value = n
    let unit = -1
    do {
      value /= 1000
      unit++
    } while (value >= 1000 && unit < units.length - 1)
    return `${value.toFixed(value < 10 ? 2 : 1)} ${units[unit]}`
  }

  function duration(seconds) {
    const s = Math.max(1, Math.round(seconds))
    if (s < 60) return `${s} s`
    if (s < 3600) {
      const m = Math.floor(s / 60)
      return m < 10 ? `${m} min ${s % 60} s` : `${m} min`
    }
    return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`
  }

  function percent(item) {
    return item.size ? Math.floor((sent(item) / item.size) * 100) : 100
  }

  // ------------------------------------------------------------- the rows

  function newItem(fields) {
    const item = {
      id: nextId++,
      fp: '',
      name: '',
      size: 0,
      type: '',
      file: null,
      url: '',
      handle: '',
      filelink: '',
      offset: 0,
      offsetKnown: false,
      live: 0,
      state: 'queued',
      status: '',
      history: [],
      resumedFrom: null,
      resumePending: false,
      gone: false,
      failures: 0,
      conflicts: 0,
      // Small at first, so the first bytes are durable (and play from the
      // filelink) soon; then sized by the measured speed.
      chunk: FIRST_CHUNK,
      samples: [],
      activeTime: 0,
      runBegan: 0,
      finishedIn: 0,
      created: Date.now(),
      controller: null,
      wake: null,
      stream: null,
      poll: 0,
      message: null,
      retryable: false,
      renderQueued: false,
      ...fields,
    }
    item.el = buildRow(item)
    return item
  }

  function buildRow(item) {
    const row = template.content.firstElementChild.cloneNode(true)
    const q = (name) => row.querySelector(`[data-testid="${name}"]`)
    const el = {
      row,
      name: q('name'),
      status: q('status'),
      bar: q('progress'),
      numbers: q('numbers'),
      pause: q('pause'),
      resume: q('resume'),
      retry: q('retry'),
      restart: q('restart'),
      cancel: q('cancel'),
      dismiss: q('dismiss'),
      message: q('message'),
      link: q('link'),
      filelink: q('filelink'),
      copy: q('copy'),
      open: q('open'),
      previewBox: q('preview-box'),
      preview: null,
    }
    el.name.textContent = item.name
    el.name.id = `upload-name-${item.id}`
    el.bar.setAttribute('aria-labelledby', el.name.id)
    for (const button of [el.pause, el.resume, el.retry, el.restart, el.cancel, el.dismiss, el.copy]) {
      button.setAttribute('aria-describedby', el.name.id)
    }
    el.pause.addEventListener('click', () => act(item, pause, el.resume))
    el.resume.addEventListener('click', () => act(item, resume, el.pause))
    el.retry.addEventListener('click', () => act(item, resume, el.pause))
    el.restart.addEventListener('click', () => act(item, restart, el.pause))
    el.cancel.addEventListener('click', () => cancel(item))
    el.dismiss.addEventListener('click', () => dismiss(item))
    el.copy.addEventListener('click', () => copyLink(item))
    el.filelink.addEventListener('focus', () => el.filelink.select())
    return el
  }

  /** Runs a button's action, keeping the keyboard focus on the row when the
   * pressed button disappears. */
  function act(item, action, next) {
    const hadFocus = item.el.row.contains(document.activeElement)
    action(item)
    render(item)
    if (hadFocus && document.activeElement && document.activeElement.hidden) {
      const target = [next, item.el.resume, item.el.pause, item.el.cancel, item.el.dismiss].find((b) => !b.hidden)
      if (target) target.focus()
    }
  }

  function sent(item) {
    if (item.state === 'done') return item.size
    // Between acknowledgements the POP's progress events tell what it has.
    const live = item.state === 'uploading' ? Math.min(item.live, item.size) : 0
    return Math.max(item.offset, live)
  }

  function sample(item) {
    const now = performance.now()
    const value = sent(item)
    const last = item.samples[item.samples.length - 1]
    if (!last || last.bytes !== value) item.samples.push({ t: now, bytes: value })
    while (item.samples.length > 2 && now - item.samples[0].t > 5000) item.samples.shift()
  }

  function speed(item) {
    const s = item.samples
    if (s.length < 2) return 0
    const first = s[0]
    const span = (performance.now() - first.t) / 1000
    if (span < 0.5) return 0
    return (s[s.length - 1].bytes - first.bytes) / span
  }

  const STATE_BADGE = {
    queued: ['Queued', 'idle'],
    paused: ['Paused', 'idle'],
    detached: ['Paused', 'idle'],
    waiting: ['Retrying', 'wait'],
    error: ['Failed', 'bad'],
  }

  function badge(item) {
    if (STATE_BADGE[item.state]) return STATE_BADGE[item.state]
    if (!item.status) return ['Starting', 'idle']
    const kind = item.status === 'Stored' ? 'done' : FINAL.has(item.status) ? 'bad' : 'busy'
    return [item.status, kind]
  }

  function scheduleRender(item) {
    if (item.renderQueued) return
    item.renderQueued = true
    requestAnimationFrame(() => {
      item.renderQueued = false
      render(item)
    })
  }

  function render(item) {
    const el = item.el
    const row = el.row
    const value = sent(item)
    if (item.state === 'uploading') sample(item)

    row.dataset.state = item.state
    row.dataset.status = item.status
    row.dataset.offset = String(item.offset)
    row.dataset.sent = String(value)
    row.dataset.size = String(item.size)
    row.dataset.handle = item.handle
    row.dataset.statusHistory = item.history.join(',')
    if (item.resumedFrom !== null) row.dataset.resumedFrom = String(item.resumedFrom)

    const [text, kind] = badge(item)
    el.status.textContent = text
    el.status.dataset.kind = kind
    el.status.title = STATUS_TEXT[text] || ''

    el.bar.max = Math.max(1, item.size)
    el.bar.value = item.size ? value : 1
    el.bar.setAttribute('aria-valuetext', `${percent(item)}%, ${bytes(value)} of ${bytes(item.size)}`)

    el.numbers.textContent = numbers(item, value)

    const unfinished = item.state !== 'done'
    el.pause.hidden = !(item.file && ['queued', 'uploading', 'waiting'].includes(item.state))
    el.resume.hidden = !(item.file && item.state === 'paused')
    el.retry.hidden = !(item.file && item.state === 'error' && item.retryable && !item.gone)
    el.restart.hidden = !(item.file && item.state === 'error' && item.gone)
    el.cancel.hidden = !unfinished
    el.cancel.textContent = item.url && !item.gone ? 'Cancel' : 'Remove'
    el.dismiss.hidden = unfinished

    if (item.message) {
      el.message.hidden = false
      el.message.textContent = item.message.text
      el.message.dataset.kind = item.message.kind || ''
    } else {
      el.message.hidden = true
    }

    if (item.filelink) {
      el.link.hidden = false
      if (el.filelink.value !== item.filelink) el.filelink.value = item.filelink
      el.open.href = item.filelink
    }
    $('empty').hidden = items.length > 0
    $('clear-finished').hidden = !items.some((i) => i.state === 'done')
  }

  function numbers(item, value) {
    const of = `${bytes(value)} of ${bytes(item.size)}`
    switch (item.state) {
      case 'uploading': {
        if (!item.url) return `${bytes(item.size)} · starting`
        const rate = speed(item)
        if (rate <= 0) return `${of} · ${percent(item)}%`
        const left = (item.size - value) / rate
        return `${of} · ${bytes(rate)}/s · ${duration(left)} left`
      }
      case 'done':
        // A resumed upload's time would leave out the part before the reload.
        return item.finishedIn > 0 && item.resumedFrom === null
          ? `${bytes(item.size)} · uploaded in ${duration(item.finishedIn)}`
          : `${bytes(item.size)} uploaded`
      case 'queued':
        return `${bytes(item.size)} · waiting for the uploads before it`
      default:
        return `${of} · ${percent(item)}%`
    }
  }

  function setMessage(item, text, kind) {
    item.message = text ? { text, kind } : null
    scheduleRender(item)
  }

  function announce(text) {
    const region = $('announcer')
    region.textContent = ''
    // A change after a pause is read out even when the text repeats.
    setTimeout(() => {
      region.textContent = text
    }, 50)
  }

  function setState(item, state) {
    if (item.state === state) return
    if (state !== 'uploading') item.samples = []
    item.state = state
    scheduleRender(item)
  }

  function setStatus(item, status) {
    if (typeof status !== 'string' || !status || status === item.status) return
    item.status = status
    if (item.history[item.history.length - 1] !== status) item.history.push(status)
    persist(item)
    if (status !== 'Uploading') announce(`${item.name}: ${status}. ${STATUS_TEXT[status] || ''}`)
    if ((status === 'InTransit' || status === 'Stored') && item.el.preview) refreshPreview(item)
    scheduleRender(item)
  }

  // ------------------------------------------------------------ uploading

  class HttpError extends Error {
    constructor(status, code, message, headers) {
      super(message || `the POP answered ${status}`)
      this.status = status
      this.code = code
      this.serverMessage = message
      this.retryAfter = retryAfter(headers.get('Retry-After'))
      const offset = headers.get('Upload-Offset')
      this.offset = offset !== null && /^\d+$/.test(offset) ? Number(offset) : null
    }
  }

  function retryAfter(value) {
    if (!value) return null
    if (/^\d+$/.test(value.trim())) return Number(value.trim())
    const at = Date.parse(value)
    return Number.isNaN(at) ? null : Math.max(0, Math.ceil((at - Date.now()) / 1000))
  }

  async function httpError(res) {
    let code = ''
    let message = ''
    try {
      const body = await res.json()
      if (body && body.error) {
        code = String(body.error.code || '')
        message = String(body.error.message || '')
      }
    } catch {
      // Not the POP's JSON error (a proxy's page, or a HEAD): the status says enough.
    }
    return new HttpError(res.status, code, message, res.headers)
  }

  function pump() {
    if (active) return
    const next = items.find((i) => i.state === 'queued' && i.file)
    if (next) run(next)
  }

  async function run(item) {
    active = item
    const controller = new AbortController()
    item.controller = controller
    const signal = controller.signal
    const began = performance.now()
    item.runBegan = began
    setState(item, 'uploading')
    while (!signal.aborted) {
      try {
        if (!item.url) await create(item, signal)
        else if (!item.offsetKnown) await syncOffset(item, signal)
        else if (item.offset < item.size) await sendChunk(item, signal)
        else {
          finish(item)
          break
        }
        item.failures = 0
        if (item.state === 'waiting' || (item.message && item.message.kind === 'wait')) {
          setMessage(item, null)
          setState(item, 'uploading')
        }
      } catch (err) {
        if (signal.aborted) break
        const next = recovery(item, err)
        if (next.fatal) {
          fail(item, next)
          break
        }
        if (next.delay > 0) await countdown(item, next, signal)
      }
    }
    item.controller = null
    item.activeTime += performance.now() - began
    if (active === item) active = null
    pump()
  }

  async function create(item, signal) {
    const res = await fetch(ENDPOINT, {
      method: 'POST',
      headers: { ...TUS, 'Upload-Length': String(item.size), 'Upload-Metadata': uploadMetadata(item) },
      signal,
    })
    if (res.status !== 201) throw await httpError(res)
    const location = res.headers.get('Location')
    if (!location) throw new Error('the POP created the upload but named no Location for it')
    item.url = new URL(location, ENDPOINT).href
    item.handle = res.headers.get('Cin-Handle') || ''
    item.filelink = res.headers.get('Cin-Filelink') || ''
    item.offset = 0
    item.offsetKnown = true
    setStatus(item, 'Uploading')
    persist(item)
    watch(item)
    showPreview(item)
    if (item.filelink) announce(`${item.name}: the filelink is ready`)
    scheduleRender(item)
  }

  async function syncOffset(item, signal) {
    const res = await fetch(item.url, { method: 'HEAD', headers: TUS, signal, cache: 'no-store' })
    if (!res.ok) throw await httpError(res)
    const offset = res.headers.get('Upload-Offset')
    if (offset === null || !/^\d+$/.test(offset)) throw new Error('the POP gave no Upload-Offset for the upload')
    const length = res.headers.get('Upload-Length')
    if (length !== null && Number(length) !== item.size) {
      throw new HttpError(412, 'length_mismatch', `the upload on the POP is ${bytes(Number(length))}, the file ${bytes(item.size)}`, res.headers)
    }
    item.offset = Math.min(Number(offset), item.size)
    item.offsetKnown = true
    item.handle = item.handle || res.headers.get('Cin-Handle') || ''
    item.filelink = item.filelink || res.headers.get('Cin-Filelink') || ''
    if (item.resumePending) {
      item.resumePending = false
      item.resumedFrom = item.offset
      setMessage(item, `Resumed at ${bytes(item.offset)}: what the POP already had is not sent again.`, 'ok')
      watch(item)
      showPreview(item)
    }
    persist(item)
    scheduleRender(item)
  }

  async function sendChunk(item, signal) {
    const start = item.offset
    const end = Math.min(item.size, start + item.chunk)
    const began = performance.now()
    const res = await fetch(item.url, {
      method: 'PATCH',
      headers: { ...TUS, 'Upload-Offset': String(start), 'Content-Type': 'application/offset+octet-stream' },
      body: item.file.slice(start, end),
      signal,
    })
    if (!res.ok) throw await httpError(res)
    const offset = res.headers.get('Upload-Offset')
    item.offset = offset !== null && /^\d+$/.test(offset) ? Math.min(Number(offset), item.size) : end
    item.conflicts = 0
    const seconds = (performance.now() - began) / 1000
    if (seconds > 0 && end > start) {
      const fit = ((end - start) / seconds) * CHUNK_SECONDS
      item.chunk = Math.max(MIN_CHUNK, Math.min(MAX_CHUNK, Math.floor(fit / MIN_CHUNK) * MIN_CHUNK))
    }
    persist(item)
    scheduleRender(item)
  }

  function finish(item) {
    // Time spent uploading: pauses and the wait for earlier files left out.
    item.finishedIn = (item.activeTime + performance.now() - item.runBegan) / 1000
    item.offset = item.size
    setState(item, 'done')
    if (!item.message || item.message.kind !== 'ok') setMessage(item, null)
    persist(item)
    watch(item)
    refreshPreview(item)
    announce(`${item.name} is uploaded`)
  }

  /** What to do after a failed request: wait and go on, or stop and say why. */
  function recovery(item, err) {
    const backoff = () => BACKOFF[Math.min(item.failures++, BACKOFF.length - 1)]
    if (!(err instanceof HttpError)) {
      if (err instanceof TypeError) {
        // fetch's network failure: nothing says what reached the POP.
        item.offsetKnown = false
        return { delay: backoff(), text: (n) => `Connection lost, retrying in ${n} s.`, online: true }
      }
      return { fatal: true, retryable: true, text: `Something went wrong: ${err.message}.` }
    }
    const said = err.serverMessage ? `: ${err.serverMessage}` : ''
    switch (err.status) {
      case 409:
        // Another request moved the offset (or ours was cut): ask where it is.
        if (++item.conflicts > 5) {
          return { fatal: true, retryable: true, text: `The upload keeps changing on the POP${said}. Is it open in another tab?` }
        }
        if (err.offset !== null && item.url) {
          item.offset = Math.min(err.offset, item.size)
          item.offsetKnown = true
        } else {
          item.offsetKnown = false
        }
        return { delay: 0 }
      case 413:
        return { fatal: true, text: `Too large for this POP${said}.` }
      case 401:
      case 403:
        // Only other credentials help, and they come with the page's URL.
        return {
          fatal: true,
          text: `Refused${said}. This POP needs an API key (and a signed policy, if the app requires security): open this page as ${location.origin}/?apikey=KEY&policy=POLICY&signature=SIGNATURE and pick the file again.`,
        }
      case 404:
      case 410:
        if (item.url) {
          return { fatal: true, gone: true, text: `This upload is no longer on the POP (it expired or was cancelled)${said}. Start over to upload the file again.` }
        }
        return { fatal: true, retryable: true, text: `The POP does not take tus uploads at /files/${said}.` }
      case 507: {
        item.offsetKnown = !item.url
        const wait = err.retryAfter ?? 30
        return { delay: Math.max(1, wait), text: (n) => `The POP's disk is full${said}. Retrying in ${n} s.` }
      }
      case 408:
      case 429:
      case 500:
      case 502:
      case 503:
      case 504: {
        item.offsetKnown = !item.url
        const wait = err.retryAfter ?? backoff()
        return { delay: Math.max(1, wait), text: (n) => `The POP is not taking the upload right now (${err.status}${said}). Retrying in ${n} s.` }
      }
      default:
        return { fatal: true, retryable: true, text: `The POP refused the upload (${err.status}${said}).` }
    }
  }

  function fail(item, next) {
    item.retryable = Boolean(next.retryable)
    item.gone = Boolean(next.gone)
    setState(item, 'error')
    setMessage(item, next.text, 'bad')
    announce(`${item.name}: ${next.text}`)
  }

  /** Waits `next.delay` seconds, saying so on the row every second; a pause
   * ends it, and so does the network coming back after a lost connection. */
  function countdown(item, next, signal) {
    setState(item, 'waiting')
    return new Promise((resolve) => {
      let left = next.delay
      const show = () => setMessage(item, next.text(left), 'wait')
      const done = () => {
        clearInterval(timer)
        window.removeEventListener('online', done)
        signal.removeEventListener('abort', done)
        item.wake = null
        if (!signal.aborted) setState(item, 'uploading')
        resolve()
      }
      const timer = setInterval(() => {
        left -= 1
        if (left <= 0) done()
        else show()
      }, 1000)
      show()
      if (left === next.delay) announce(`${item.name}: ${next.text(left)}`)
      if (next.online) window.addEventListener('online', done)
      signal.addEventListener('abort', done)
      item.wake = done
    })
  }

  // -------------------------------------------------------------- actions

  function pause(item) {
    if (!['queued', 'uploading', 'waiting'].includes(item.state)) return
    setState(item, 'paused')
    // The POP keeps what arrived of a cut-off chunk; the resume asks it where it is.
    if (item.url) item.offsetKnown = false
    if (item.controller) item.controller.abort()
    setMessage(item, 'Paused. The POP keeps what it received.', '')
  }

  function resume(item) {
    if (!item.file) return
    item.failures = 0
    item.conflicts = 0
    if (item.url) item.offsetKnown = false
    item.retryable = false
    setMessage(item, null)
    setState(item, 'queued')
    pump()
  }

  function restart(item) {
    forget(item)
    closeStream(item)
    Object.assign(item, { url: '', handle: '', filelink: '', offset: 0, live: 0, status: '', history: [], gone: false, resumedFrom: null })
    item.el.link.hidden = true
    removePreview(item)
    resume(item)
  }

  async function cancel(item) {
    if (item.controller) item.controller.abort()
    if (item.wake) item.wake()
    removeRow(item)
    forget(item)
    closeStream(item)
    if (item.url && !item.gone) {
      // Termination frees the POP's disk at once instead of at expiry.
      try {
        await fetch(item.url, { method: 'DELETE', headers: TUS })
      } catch {
        // Offline: the unfinished upload expires on the POP by itself.
      }
    }
    announce(`${item.name}: cancelled`)
  }

  function dismiss(item) {
    removeRow(item)
    forget(item)
    closeStream(item)
  }

  function removeRow(item) {
    const at = items.indexOf(item)
    if (at < 0) return
    const hadFocus = item.el.row.contains(document.activeElement)
    items.splice(at, 1)
    item.el.row.remove()
    if (active === item) active = null
    if (hadFocus) {
      const neighbour = items[at] || items[at - 1]
      const button = neighbour && [...neighbour.el.row.querySelectorAll('button')].find((b) => !b.hidden)
      ;(button || drop).focus()
    }
    $('empty').hidden = items.length > 0
    $('clear-finished').hidden = !items.some((i) => i.state === 'done')
    pump()
  }

  async function copyLink(item) {
    const button = item.el.copy
    let copied = false
    try {
      await navigator.clipboard.writeText(item.filelink)
      copied = true
    } catch {
      // No clipboard API (a page not served over HTTPS): select the text instead.
      item.el.filelink.focus()
      item.el.filelink.select()
      try {
        copied = document.execCommand('copy')
      } catch {
        copied = false
      }
    }
    button.textContent = copied ? 'Copied' : 'Press Ctrl+C'
    announce(copied ? 'Filelink copied' : 'Filelink selected: press Ctrl+C (or Cmd+C) to copy it')
    setTimeout(() => {
      button.textContent = 'Copy'
    }, 2000)
  }

  // ------------------------------------------------------------- previews

  function showPreview(item) {
    if (!item.filelink || item.el.preview) return
    let media
    if (item.type.startsWith('video/')) {
      media = document.createElement('video')
      media.controls = true
      media.muted = true
      media.playsInline = true
      media.preload = 'auto'
      media.addEventListener('loadedmetadata', () => (item.el.previewBox.hidden = false))
    } else if (item.type.startsWith('image/')) {
      media = document.createElement('img')
      media.alt = `Preview of ${item.name}`
      media.decoding = 'async'
      media.addEventListener('load', () => (item.el.previewBox.hidden = false))
    } else {
      return
    }
    media.dataset.testid = 'preview'
    media.addEventListener('error', () => (item.previewFailed = true))
    media.src = item.filelink + readQuery()
    item.el.preview = media
    item.el.previewBox.append(media)
  }

  /** Asks again for a preview that failed while the file was still uploading. */
  function refreshPreview(item) {
    const media = item.el.preview
    if (!media || !item.previewFailed) return
    item.previewFailed = false
    media.src = item.filelink + readQuery()
    if (media.load) media.load()
  }

  function removePreview(item) {
    if (item.el.preview) item.el.preview.remove()
    item.el.preview = null
    item.el.previewBox.hidden = true
  }

  // ------------------------------------------------------- status streams

  function wantsStream(item) {
    return Boolean(item.handle) && !FINAL.has(item.status) && items.includes(item) && item.state !== 'detached'
  }

  /** Opens the event streams the rows need, the running upload's first,
   * within MAX_STREAMS; the others wait for a free one. */
  function balanceStreams() {
    const wanted = items.filter(wantsStream).sort((a, b) => (b === active) - (a === active) || a.created - b.created)
    const keep = new Set(wanted.slice(0, MAX_STREAMS))
    for (const item of items) if (item.stream && !keep.has(item)) closeStream(item, true)
    for (const item of keep) if (!item.stream && !item.poll) openStream(item)
  }

  function watch(item) {
    balanceStreams()
    // The upload being sent always has its stream.
    if (item === active && !item.stream && wantsStream(item) && !item.poll) openStream(item)
  }

  function openStream(item) {
    const source = new EventSource(`/${encodeURIComponent(item.handle)}/events${readQuery()}`)
    item.stream = source
    const data = (event) => {
      try {
        const value = JSON.parse(event.data)
        return value && value.handle === item.handle ? value : null
      } catch {
        return null
      }
    }
    source.addEventListener('status', (event) => {
      const value = data(event)
      if (!value) return
      setStatus(item, value.status)
      if (FINAL.has(value.status)) {
        closeStream(item)
        balanceStreams()
      }
    })
    source.addEventListener('progress', (event) => {
      const value = data(event)
      if (!value || !Number.isFinite(value.received)) return
      item.live = value.received
      scheduleRender(item)
    })
    source.addEventListener('error', () => {
      // EventSource reconnects by itself after a dropped stream; CLOSED means
      // it gave up (an HTTP error): ask the metadata later instead.
      if (source.readyState !== EventSource.CLOSED || item.stream !== source) return
      closeStream(item)
      pollStatus(item, 5000)
    })
  }

  function closeStream(item, reopenLater) {
    if (item.stream) item.stream.close()
    item.stream = null
    if (!reopenLater && item.poll) {
      clearTimeout(item.poll)
      item.poll = 0
    }
  }

  function pollStatus(item, delay) {
    if (item.poll) return
    item.poll = setTimeout(async () => {
      item.poll = 0
      if (!items.includes(item)) return
      try {
        const res = await fetch(`/${encodeURIComponent(item.handle)}/metadata${readQuery()}`, { cache: 'no-store' })
        if (res.status === 404) return
        if (res.ok) setStatus(item, (await res.json()).status)
      } catch {
        // Offline: try again below.
      }
      if (wantsStream(item)) balanceStreams()
    }, delay)
  }

  // ------------------------------------------------------ picking files

  function addFiles(files) {
    let first = null
    for (const file of files) {
      const fp = fingerprint(file)
      // A row left from before a reload: this is its file, so it continues.
      const waiting = items.find((i) => i.fp === fp && !i.file && i.state !== 'done')
      if (waiting) {
        attach(waiting, file)
        first = first || waiting
        continue
      }
      const same = items.find((i) => i.fp === fp && i.file && i.state !== 'done')
      if (same) {
        flash(same)
        if (same.state === 'paused') resume(same)
        first = first || same
        continue
      }
      const item = newItem({ fp, name: file.name, size: file.size, type: file.type, file })
      items.push(item)
      list.append(item.el.row)
      render(item)
      first = first || item
    }
    if (first) first.el.row.scrollIntoView({ block: 'nearest' })
    pump()
  }

  function attach(item, file) {
    item.file = file
    item.type = item.type || file.type
    if (item.gone) {
      restart(item)
      return
    }
    item.resumePending = true
    item.offsetKnown = false
    setMessage(item, 'Asking the POP how much it has…', '')
    setState(item, 'queued')
    render(item)
  }

  function flash(item) {
    const row = item.el.row
    row.classList.remove('flash')
    void row.offsetWidth
    row.classList.add('flash')
  }

  /** Rows of the uploads a previous visit left; the unfinished ones wait for
   * their file. */
  async function restore() {
    const unfinished = []
    for (const entry of storedEntries()) {
      const item = newItem({
        fp: String(entry.fp || ''),
        name: entry.name,
        size: Number(entry.size) || 0,
        type: String(entry.type || ''),
        url: entry.url,
        handle: String(entry.handle || ''),
        filelink: String(entry.filelink || ''),
        offset: Number(entry.offset) || 0,
        status: String(entry.status || ''),
        created: Number(entry.created) || Date.now(),
        state: entry.done ? 'done' : 'detached',
      })
      if (item.status) item.history.push(item.status)
      if (!entry.done) {
        item.message = { text: 'Stopped when the page closed: pick or drop the same file to resume.', kind: 'wait' }
        unfinished.push(item)
      }
      items.push(item)
      list.append(item.el.row)
      showPreview(item)
      render(item)
    }
    balanceStreams()
    // How far each unfinished upload got, and whether the POP still has it.
    for (const item of unfinished) {
      try {
        const res = await fetch(item.url, { method: 'HEAD', headers: TUS, cache: 'no-store' })
        if (item.state !== 'detached') continue
        const offset = res.headers.get('Upload-Offset')
        if (res.ok && offset !== null && /^\d+$/.test(offset)) {
          item.offset = Math.min(Number(offset), item.size)
          persist(item)
        } else if (res.status === 404 || res.status === 410) {
          item.gone = true
          item.state = 'error'
          item.message = { text: 'This upload expired on the POP. Pick or drop the file to upload it again.', kind: 'bad' }
        }
        render(item)
      } catch {
        // Offline: the row shows what was stored; the HEAD of the resume will tell.
      }
    }
  }

  // ---------------------------------------------------------------- wiring

  function setup() {
    $('pop-name').textContent = `CIN edge at ${location.host}`
    const credentials = $('credentials')
    if (config.apikey || config.policy) {
      const parts = []
      if (config.apikey) parts.push(`API key ${config.apikey}`)
      if (config.policy && config.signature) parts.push('a signed policy')
      credentials.textContent = `Uploads carry ${parts.join(' and ')}.`
      credentials.hidden = false
    }

    const openPicker = () => input.click()
    drop.addEventListener('click', openPicker)
    drop.addEventListener('keydown', (event) => {
      if (event.key === 'Enter' || event.key === ' ') {
        event.preventDefault()
        openPicker()
      }
    })
    input.addEventListener('change', () => {
      addFiles([...input.files])
      // The same file can be picked again (to resume it).
      input.value = ''
    })

    // Files dropped anywhere on the page, not only on the zone, are taken
    // (the browser would otherwise open them in place of the page).
    let depth = 0
    const hasFiles = (event) => event.dataTransfer && [...event.dataTransfer.types].includes('Files')
    window.addEventListener('dragenter', (event) => {
      if (!hasFiles(event)) return
      event.preventDefault()
      depth++
      drop.classList.add('over')
    })
    window.addEventListener('dragleave', () => {
      depth = Math.max(0, depth - 1)
      if (!depth) drop.classList.remove('over')
    })
    window.addEventListener('dragover', (event) => {
      if (!hasFiles(event)) return
      event.preventDefault()
      event.dataTransfer.dropEffect = 'copy'
    })
    window.addEventListener('drop', (event) => {
      if (!hasFiles(event)) return
      event.preventDefault()
      depth = 0
      drop.classList.remove('over')
      const files = []
      const entries = event.dataTransfer.items ? [...event.dataTransfer.items] : []
      for (const [i, file] of [...event.dataTransfer.files].entries()) {
        // A dropped folder arrives as a "file" that cannot be read.
        const entry = entries[i] && entries[i].webkitGetAsEntry ? entries[i].webkitGetAsEntry() : null
        if (entry && entry.isDirectory) continue
        files.push(file)
      }
      addFiles(files)
    })

    $('clear-finished').addEventListener('click', () => {
      for (const item of items.filter((i) => i.state === 'done')) dismiss(item)
      drop.focus()
    })
    window.addEventListener('online', () => {
      for (const item of items) if (item.wake && item.state === 'waiting') item.wake()
    })
    // Speed and time left move on even when no byte was acknowledged.
    setInterval(() => {
      if (active && active.state === 'uploading') render(active)
    }, 1000)
    $('empty').hidden = items.length > 0
    restore()
  }

  setup()
})()
