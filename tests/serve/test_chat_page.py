"""The chat page at / in headless Chromium (Debian's /usr/bin/chromium, driven by playwright's sync API; playwright
downloads no browser here), against `vlmjax serve` on the tiny model with an API key: a two-turn chat, one image
attached with the file picker and one pasted, whose streamed replies are the API's own; errors shown plainly."""

import base64
import http.client
import io
import os
import shutil

import openai
import pytest
from PIL import Image, ImageDraw

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
KEY, MODEL, MAX_LEN = "page-key", "tiny", 128  # MODEL: the checkpoint directory's name, the served model's
SETTINGS = dict(temperature=0, top_p=1, max_tokens=12, seed=7)  # greedy: the page's reply is the API's
WAIT_MS = 180_000  # a reply's first request compiles the model, on a busy 2-core host

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"needs Chromium at {CHROMIUM}: "
                                "apt-get install chromium (Debian's package; .ci/run installs it)")


@pytest.fixture(scope="module")
def port(tiny_vlm, tmp_path_factory, serve_process):
  from vlmjax.interop import hf
  directory = tmp_path_factory.mktemp("chat_page")
  checkpoint = str(directory / MODEL)
  hf.save_pretrained(checkpoint, tiny_vlm.config, tiny_vlm.params, tiny_vlm.tokenizer, tiny_vlm.image_processor,
                     tiny_vlm.eos_token_ids, tiny_vlm.pad_token_id, max_len=MAX_LEN)
  with serve_process(checkpoint, directory / "serve.log", "--api_key", KEY, "--slots", "2") as (_, port):
    yield port


@pytest.fixture(scope="module")
def browser():
  sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the dev extra)")
  with sync_api.sync_playwright() as playwright:
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
    yield browser
    browser.close()


def _png(shape: str, colour: str) -> bytes:
  image = Image.new("RGB", (96, 96), "white")
  draw, box = ImageDraw.Draw(image), (22, 22, 74, 74)
  draw.ellipse(box, fill=colour) if shape == "circle" else draw.rectangle(box, fill=colour)
  out = io.BytesIO()
  image.save(out, format="PNG")
  return out.getvalue()


def _api_reply(port: int, messages: list[dict]) -> str:
  client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=WAIT_MS / 1000)
  return client.chat.completions.create(model=MODEL, messages=messages, **SETTINGS).choices[0].message.content


def _paste(page, png: bytes) -> None:
  """A paste of an image file into the message box, as the browser fires it on Ctrl+V."""
  page.evaluate("""(b64) => {
    const data = new DataTransfer();
    data.items.add(new File([Uint8Array.from(atob(b64), (c) => c.charCodeAt(0))], "pasted.png", {type: "image/png"}));
    document.getElementById("prompt").dispatchEvent(
        new ClipboardEvent("paste", {clipboardData: data, bubbles: true, cancelable: true}));
  }""", base64.b64encode(png).decode())


def test_the_page_needs_no_key_and_is_not_cached(port):
  connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
  connection.request("GET", "/")
  response = connection.getresponse()
  page = response.read().decode()
  assert response.status == 200, page
  assert response.getheader("Content-Type").startswith("text/html")
  assert response.getheader("Cache-Control") == "no-cache"
  assert "<title>vlmjax chat</title>" in page


def test_two_turns_with_an_attached_and_a_pasted_image_stream_the_api_replies(port, browser, tmp_path):
  from playwright.sync_api import expect
  base = f"http://127.0.0.1:{port}"
  circle, square = _png("circle", "#d62828"), _png("square", "#1d4ed8")
  (tmp_path / "circle.png").write_bytes(circle)
  question, follow_up = "What colour is the circle?", "Describe the picture in detail."
  circle_url = f"data:image/png;base64,{base64.b64encode(circle).decode()}"
  square_url = f"data:image/png;base64,{base64.b64encode(square).decode()}"
  first_turn = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": circle_url}},
                                             {"type": "text", "text": question}]}]
  expected = _api_reply(port, first_turn)  # before the page: it compiles the model
  assert expected, "the tiny model wrote nothing; pick another question"

  page = browser.new_page(viewport={"width": 1100, "height": 720})
  requests = []
  page.on("request", lambda request: requests.append(request))
  page.goto(f"{base}/")
  page.fill("#api-key", KEY)
  page.press("#api-key", "Tab")  # `change`: the key is stored and the model listed with it
  expect(page.locator("#model")).to_have_text(f"model: {MODEL}")
  assert page.evaluate("localStorage.getItem('vlmjax.api-key')") == KEY
  for field, value in [("#temperature", "0"), ("#top-p", "1"), ("#seed", "7"), ("#max-tokens", "100000")]:
    page.fill(field, value)

  # An error from the API, in OpenAI's shape, is shown plainly; the message goes back to the box.
  page.set_input_files("#file", str(tmp_path / "circle.png"))
  expect(page.locator("#attachments img")).to_have_count(1)
  page.fill("#prompt", question)
  page.click("#send")
  expect(page.locator("#error")).to_contain_text("Error (400 context_length_exceeded): a prompt of",
                                                 timeout=WAIT_MS)
  expect(page.locator(".msg")).to_have_count(0)
  assert page.input_value("#prompt") == question
  expect(page.locator("#attachments img")).to_have_count(1)

  page.fill("#max-tokens", str(SETTINGS["max_tokens"]))
  page.click("#send")
  expect(page.locator(".msg.assistant[data-status=done]")).to_have_count(1, timeout=WAIT_MS)
  expect(page.locator("#error")).to_be_empty()
  assert page.locator(".msg.assistant .text").first.text_content() == expected

  chats = [r for r in requests if r.url == f"{base}/v1/chat/completions"]
  assert len(chats) == 2, [r.url for r in requests]
  assert chats[-1].headers["authorization"] == f"Bearer {KEY}"
  body = chats[-1].post_data_json
  assert body["stream"] is True and body["model"] == MODEL
  assert {name: body[name] for name in SETTINGS} == SETTINGS, body
  assert body["messages"] == first_turn

  # The second turn: a pasted image at low detail, Enter sends, the whole conversation goes with it.
  page.select_option("#detail", "low")
  assert page.evaluate("localStorage.getItem('vlmjax.detail')") == "low"
  _paste(page, square)
  expect(page.locator("#attachments img")).to_have_count(1)
  page.fill("#prompt", follow_up)
  page.press("#prompt", "Enter")
  expect(page.locator(".msg.assistant[data-status=done]")).to_have_count(2, timeout=WAIT_MS)
  expect(page.locator(".msg.user")).to_have_count(2)
  conversation = first_turn + [{"role": "assistant", "content": expected},
                               {"role": "user", "content": [{"type": "image_url", "image_url": {
                                   "url": square_url, "detail": "low"}}, {"type": "text", "text": follow_up}]}]
  chats = [r for r in requests if r.url == f"{base}/v1/chat/completions"]
  assert len(chats) == 3 and chats[-1].post_data_json["messages"] == conversation
  assert page.locator(".msg.assistant .text").nth(1).text_content() == _api_reply(port, conversation)
  assert all(r.url.startswith((base, "data:")) for r in requests), [r.url for r in requests]  # nothing external

  screenshot = tmp_path / "chat_page.png"
  page.screenshot(path=str(screenshot))
  if os.environ.get("VLMJAX_SCREENSHOT_DIR"):
    os.makedirs(os.environ["VLMJAX_SCREENSHOT_DIR"], exist_ok=True)
    shutil.copy(screenshot, os.environ["VLMJAX_SCREENSHOT_DIR"])
  page.close()


def test_without_the_key_the_page_shows_the_401(port, browser):
  from playwright.sync_api import expect
  page = browser.new_page()
  page.goto(f"http://127.0.0.1:{port}/")  # the page itself loads; the model list is behind the key
  expect(page.locator("#error")).to_have_text("Error (401 invalid_api_key): missing API key: send the header "
                                              "'Authorization: Bearer <key>'")
  expect(page.locator("#model")).to_have_text("model: unknown")
  page.fill("#prompt", "Hello?")
  page.click("#send")  # asks for the model again, and is told again
  expect(page.locator("#error")).to_contain_text("401 invalid_api_key")
  expect(page.locator(".msg")).to_have_count(0)
  assert page.input_value("#prompt") == "Hello?"
  page.close()
