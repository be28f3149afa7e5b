"""The images of a request, read with bounded memory: the encoded bytes and each image's header first, decoded
only once the whole request is known to fit its limits.

An image comes inline as a base64 `data:` URL, or as a local file under the directory the operator allows; the
server never fetches from the network. Every refusal is an APIError 400 that names the image's place in the
request (`messages.0.content.1`).
"""

import base64
import binascii
import dataclasses
import io
import os

from PIL import Image, UnidentifiedImageError

from vlmjax.serve.errors import APIError

MAX_IMAGE_BYTES = 20 * 2**20  # encoded size of one image
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_REQUEST_PIXELS = 4 * 2048 * 2048
IMAGE_FORMATS = ("PNG", "JPEG")


@dataclasses.dataclass(frozen=True)
class ImageLimits:
  """What one request may send: `max_bytes` encoded and `max_pixels` per image, `max_request_pixels` in all."""

  max_bytes: int = MAX_IMAGE_BYTES
  max_pixels: int = MAX_IMAGE_PIXELS
  max_request_pixels: int = MAX_REQUEST_PIXELS


def open_images(urls: list[tuple[str, str]], image_dir: str | None, limits: ImageLimits) -> list[Image.Image]:
  """The decoded images of (url, where in the request) pairs. Every image's header is read and checked (format,
  pixels, the request's pixel budget) before any image is decoded."""
  opened, pixels = [], 0
  for url, where in urls:
    image = _open(_read(url, where, image_dir, limits.max_bytes), where)
    if image.width * image.height > limits.max_pixels:
      raise APIError(400, f"{where}: an image of {image.width}x{image.height} pixels; this server takes at most "
                     f"{limits.max_pixels} pixels per image", param=where, code="image_too_large")
    pixels += image.width * image.height
    if pixels > limits.max_request_pixels:
      raise APIError(400, f"{where}: the request's images hold more than {limits.max_request_pixels} pixels in all",
                     param=where, code="image_too_large")
    opened.append((image, where))
  return [_decode(image, where) for image, where in opened]


def each_processed(image_processors: list, images: list[Image.Image], urls: list[tuple[str, str]]) -> list:
  """The decoded `images` of (url, where in the request) pairs, each through its processor (the checkpoint's at the
  image's `detail`), which makes something of each image (LLaVA-NeXT's (tiles, size), Qwen2.5-VL's (patches, grid));
  an image it refuses (Qwen2.5-VL's: a side over 200 times the other) is an APIError 400 that names it."""
  processed = []
  for image_processor, image, (_, where) in zip(image_processors, images, urls, strict=True):
    try:
      processed += image_processor([image])
    except ValueError as error:
      raise APIError(400, f"{where}: {error}", param=where, code="invalid_image") from error
  return processed


def _read(url: str, where: str, image_dir: str | None, max_bytes: int) -> bytes:
  """The encoded bytes of one image URL."""
  if url.startswith("data:"):
    header, _, payload = url.partition(",")
    if not header.endswith(";base64"):
      raise APIError(400, f"{where}: a data: URL must be base64 (data:image/png;base64,...)", param=where)
    if len(payload) * 3 // 4 > max_bytes:
      raise APIError(400, f"{where}: the image is larger than {max_bytes} bytes", param=where, code="image_too_large")
    try:
      return base64.b64decode(payload, validate=True)
    except binascii.Error as error:
      raise APIError(400, f"{where}: the data: URL is not valid base64 ({error})", param=where,
                     code="invalid_image") from error
  if url.split(":", 1)[0].lower() in ("http", "https"):
    raise APIError(400, f"{where}: remote image URLs are not fetched (the server does not reach the network); send "
                   f"the image inline as a base64 data: URL", param=where, code="remote_image_refused")
  if url.startswith("file://") or os.path.isabs(url):
    return _read_allowed_file(url.removeprefix("file://"), where, image_dir, max_bytes)
  raise APIError(400, f"{where}: an image URL is a base64 data: URL or an absolute local path, got {url[:40]!r}",
                 param=where)


def _read_allowed_file(path: str, where: str, image_dir: str | None, max_bytes: int) -> bytes:
  if image_dir is None:
    raise APIError(400, f"{where}: local image files are not allowed on this server (the operator allows a directory "
                   f"with --image_dir); send the image as a base64 data: URL", param=where)
  allowed, real = os.path.realpath(image_dir), os.path.realpath(path)
  if os.path.commonpath([allowed, real]) != allowed:
    raise APIError(400, f"{where}: {path} is outside the directory this server allows images from", param=where)
  if not os.path.isfile(real):
    raise APIError(400, f"{where}: no image file {path}", param=where)
  if os.path.getsize(real) > max_bytes:
    raise APIError(400, f"{where}: the image is larger than {max_bytes} bytes", param=where, code="image_too_large")
  with open(real, "rb") as f:
    return f.read()


def _open(data: bytes, where: str) -> Image.Image:
  """The image's header only (Pillow decodes the pixels on `load`)."""
  try:
    image = Image.open(io.BytesIO(data))
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
    raise _undecodable(where, error) from error
  if image.format not in IMAGE_FORMATS:
    raise APIError(400, f"{where}: a {image.format} image; send a PNG or JPEG", param=where, code="invalid_image")
  return image


def _decode(image: Image.Image, where: str) -> Image.Image:
  try:
    image.load()
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
    raise _undecodable(where, error) from error
  return image


def _undecodable(where: str, error: Exception) -> APIError:
  detail = "" if isinstance(error, UnidentifiedImageError) else f" ({error})"
  return APIError(400, f"{where}: not a decodable PNG or JPEG image{detail}", param=where, code="invalid_image")
