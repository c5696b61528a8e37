"""Open an HTML page in a real headless Chromium (Debian's `chromium`, which `.ci/run` installs) and
report what the browser made of it: every image (loaded, its natural size), every audio element
(its source, the duration the browser decoded, its media error), the headings.

A copy of the page gets a small script that waits for the page's load event and for each audio
element's metadata, then writes its findings as JSON into the DOM, which `--dump-dom` prints.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

PROBE = """
<script>
function metadata(a) {
  return new Promise(done => {
    if (a.readyState >= 1 || a.error) return done();
    a.addEventListener('loadedmetadata', done); a.addEventListener('error', done); setTimeout(done, 8000);
  });
}
window.addEventListener('load', async () => {
  const audio = [...document.querySelectorAll('audio')];
  await Promise.all(audio.map(metadata));
  const out = document.createElement('pre');
  out.id = 'browser-check';
  out.textContent = JSON.stringify({
    title: document.title,
    headings: [...document.querySelectorAll('h1, h2, h3')].map(h => h.textContent),
    images: [...document.images].map(i => ({alt: i.alt, loaded: i.complete && i.naturalWidth > 0,
                                            width: i.naturalWidth, height: i.naturalHeight})),
    audio: audio.map(a => ({src: (a.currentSrc || a.src || '').slice(0, 64),
                            src_length: (a.currentSrc || a.src || '').length,
                            duration: a.duration, error: a.error ? a.error.code : null})),
    text_length: document.body.innerText.length,
  });
  document.body.appendChild(out);
});
</script>
"""


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "chromium is not installed: apt-get install -y --no-install-recommends chromium (.ci/run does)"
    return found


def open_page(page: Path, work: Path, timeout_s: float = 120) -> dict[str, Any]:
    """What headless Chromium found in ``page`` (see the module's docstring)."""
    work.mkdir(parents=True, exist_ok=True)
    probed = work / "probed.html"
    text = page.read_text(encoding="utf-8")
    assert "</body>" in text, f"{page} has no </body>"
    probed.write_text(text.replace("</body>", PROBE + "</body>", 1), encoding="utf-8")
    command = [
        chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--mute-audio",
        f"--user-data-dir={work / 'profile'}",  # its own profile: other tests may run a browser too
        "--virtual-time-budget=20000", "--dump-dom", probed.as_uri(),
    ]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    assert proc.returncode == 0, f"chromium exited {proc.returncode}: {proc.stderr[-2000:]}"
    found = re.search(r'<pre id="browser-check">(.*?)</pre>', proc.stdout, re.S)
    assert found, f"the probe did not run (no #browser-check in the DOM); stderr: {proc.stderr[-2000:]}"
    import html

    return json.loads(html.unescape(found.group(1)))

