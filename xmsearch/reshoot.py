"""Re-shots of a product photo: the same product as a second photo shoot would show it.

Training matches re-shots of every catalogue photo against its item (``xmsearch.train``),
so that a shopper's photo, taken elsewhere, finds the product.  Ingestion can use them too
(``ingest_catalog(photo_views=N)``): an item's photo-side vector then also averages the
photo embeddings of N re-shots, rendered here, client-side, from a seed made of the item's
id, so the same item always gets the same re-shots.

Only light dependencies (numpy, Pillow, :mod:`xmsearch.preprocess`): the client imports this module.
"""

from __future__ import annotations

import io
import math
import random

import numpy as np
from PIL import Image

from xmsearch.preprocess import decode_image


def augment_photo(data: bytes, rng: random.Random) -> bytes:
    """A re-shot photo: new backdrop, framing (zoom in or out, offset, small rotation),
    sometimes a mirror, new light (exposure, colour cast, a gradient across the frame),
    sensor noise and JPEG.

    The backdrop swap keys out pixels close to the photo's border colours (product shots
    are taken on plain backdrops) and paints a random colour gradient there, so the model
    cannot identify a product by the backdrop it happened to be shot on.  The changes stay
    within what a second shoot of the same product does: the product's own colours move
    by a few percent, never to another colour name.
    """
    # Decoded as the server decodes a photo (transparency on white, the same size limits), so
    # that a re-shot shows the product the served photo embedding saw.
    img = decode_image(data, what="photo")
    w, h = img.size
    if rng.random() < 0.8:
        arr = np.asarray(img).astype(np.int16)
        # The backdrop is rarely one colour (light falls off, walls meet floors): key
        # out pixels close to any of 16 colours sampled around the border (fewer around a
        # photo of a few pixels).
        ring = np.concatenate([arr[0], arr[:, -1], arr[-1, ::-1], arr[::-1, 0]])
        keys = np.rint([np.median(seg, 0) for seg in np.array_split(ring, min(16, len(ring)))]).astype(np.int16)
        # The mask at half resolution (4x cheaper, edges are blurred later anyway), one
        # contiguous plane per channel: sums over a 3-wide last axis are slow in numpy.
        r, g, b = np.ascontiguousarray(arr[::2, ::2].transpose(2, 0, 1))
        mask = np.zeros(r.shape, bool)
        for kr, kg, kb in keys:
            mask |= np.abs(r - kr) + np.abs(g - kg) + np.abs(b - kb) < 50
        backdrop = mask.repeat(2, 0).repeat(2, 1)[:h, :w]
        top = np.array([rng.randint(90, 255) for _ in range(3)], np.float32)
        bottom = np.clip(top + rng.uniform(-50, 50), 0, 255)
        grad = np.linspace(top, bottom, h, dtype=np.float32)  # [h, 3]: one colour per row
        # Broadcast per row, not gathered per pixel (half the time, the same pixels).
        np.copyto(arr, grad.astype(np.int16)[:, None, :], where=backdrop[..., None])
        img = Image.fromarray(arr.astype(np.uint8))
    fill = tuple(int(v) for v in np.asarray(img)[0, 0])
    s = rng.uniform(0.82, 1.12)  # < 1 zooms in (crop), > 1 zooms out (pad with the backdrop)
    cw, ch = int(w * s), int(h * s)
    if s <= 1.0:
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        img = img.crop((x, y, x + cw, y + ch)).resize((w, h), Image.BILINEAR)
    else:
        canvas = Image.new("RGB", (cw, ch), fill)
        canvas.paste(img, (rng.randint(0, cw - w), rng.randint(0, ch - h)))
        img = canvas.resize((w, h), Image.BILINEAR)
    img = img.rotate(rng.uniform(-10, 10), resample=Image.BILINEAR, fillcolor=fill)
    if rng.random() < 0.25:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    arr = np.asarray(img).astype(np.float32)
    theta, amp = rng.uniform(0, 2 * math.pi), rng.uniform(0.0, 0.15)
    gy, gx = (g.astype(np.float32) for g in np.ogrid[-0.5:0.5:h * 1j, -0.5:0.5:w * 1j])  # [h, 1], [1, w]
    light = rng.uniform(0.85, 1.15) * (1.0 + amp * (gx * math.cos(theta) + gy * math.sin(theta)))
    cast = np.array([rng.uniform(0.95, 1.05) for _ in range(3)], np.float32)
    arr *= light[..., None]  # in place: the products of `arr * light * cast`, no temporaries
    arr *= cast
    arr += np.random.default_rng(rng.getrandbits(32)).normal(0.0, rng.uniform(0.0, 5.0), (h, w, 1))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=rng.randint(70, 95))
    return buf.getvalue()


def photo_views(photo: bytes, key: str, n: int) -> list[bytes]:
    """``n`` re-shots of ``photo`` (:func:`augment_photo`), the same for the same ``key``
    (an item id) on every run and machine: Python seeds a ``random.Random`` from a string
    through SHA-512, not through the per-process string hash."""
    rng = random.Random(f"xmsearch photo views {key}")
    return [augment_photo(photo, rng) for _ in range(n)]
