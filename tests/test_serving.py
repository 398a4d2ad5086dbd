"""The exported repository served by a real tritonserver, compared with the in-process reference.

``xm_server`` serves ``exported_repository`` (cpu target, seeded untrained fusion) and
``reference_pipeline`` is the same function in PyTorch: every ensemble must reproduce it.
Requests go through ``tritonclient.grpc`` directly, so that status codes and server
messages are seen exactly as any client sees them.
"""

from __future__ import annotations

import io
import re
import shutil
import struct
import threading
import time
import zlib

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from xmsearch import spec as S
from xmsearch.export.pipeline import sample_images

pytestmark = pytest.mark.triton

MIN_COSINE = 0.999
ENGLISH = ["blue down jacket", "women's red striped summer dress",
           "small brown crossbody handbag with gold buckle, vegan leather"]
CHINESE = ["蓝色羽绒服", "红色条纹连衣裙 女款"]
INVALID = "StatusCode.INVALID_ARGUMENT"


# --------------------------------------------------------------------------- helpers


def encode(img: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def alpha_png() -> bytes:
    """A product cut-out: opaque shape on a transparent background."""
    yy, xx = np.mgrid[0:180, 0:260]
    rgba = np.zeros((180, 260, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2] = 200, xx % 256, yy % 256
    rgba[..., 3] = np.where((xx - 130) ** 2 / 110**2 + (yy - 90) ** 2 / 70**2 < 1, 255, 0)
    return encode(Image.fromarray(rgba, "RGBA"), "PNG")


def photo(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.linspace(rng.uniform(0, 255, 3), rng.uniform(0, 255, 3), w)[None, :, :]
    arr = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def bytes_tensor(name: str, rows: list[bytes]) -> grpcclient.InferInput:
    arr = np.array([[r] for r in rows], dtype=object)
    t = grpcclient.InferInput(name, list(arr.shape), "BYTES")
    t.set_data_from_numpy(arr)
    return t


def raw_infer(client: grpcclient.InferenceServerClient, model: str,
              inputs: list[grpcclient.InferInput], output: str = S.EMBEDDING) -> np.ndarray:
    result = client.infer(model, inputs, outputs=[grpcclient.InferRequestedOutput(output)],
                          client_timeout=60)
    return result.as_numpy(output)


def embed(client, model: str, texts: list[str] | None = None,
          images: list[bytes] | None = None, output: str = S.EMBEDDING) -> np.ndarray:
    inputs = []
    if texts is not None:
        inputs.append(bytes_tensor(S.TEXT, [t.encode() for t in texts]))
    if images is not None:
        inputs.append(bytes_tensor(S.IMAGE, images))
    return raw_infer(client, model, inputs, output)


def assert_matches(served: np.ndarray, reference: np.ndarray, what: str) -> None:
    assert served.shape == reference.shape == (len(reference), 256), what
    assert served.dtype == np.float32, what
    np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-4, err_msg=what)
    cos = np.sum(served * reference, axis=1) / np.linalg.norm(reference, axis=1)
    assert cos.min() >= MIN_COSINE, f"{what}: cosines {np.round(cos, 6)}"


def rejection(client, model: str, inputs: list[grpcclient.InferInput]) -> InferenceServerException:
    """The error of a request that must be refused (every output asked for: any model)."""
    with pytest.raises(InferenceServerException) as info:
        client.infer(model, inputs, client_timeout=60)
    return info.value


def model_stats(client, model: str) -> tuple[int, int]:
    """(inference_count, execution_count) once two reads 50 ms apart agree.

    Triton updates a model's statistics just after it answers, so a read right after the
    last response can miss it.
    """
    def read() -> tuple[int, int]:
        s = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
        return int(s.get("inference_count", 0)), int(s.get("execution_count", 0))

    current = read()
    for _ in range(40):
        time.sleep(0.05)
        again = read()
        if again == current:
            break
        current = again
    return current


@pytest.fixture(scope="module")
def client(xm_server):
    c = grpcclient.InferenceServerClient(xm_server.url)
    yield c
    c.close()


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    return [*sample_images(3), alpha_png()]


# ------------------------------------------------------------------------- parity


@pytest.mark.parametrize("texts", [ENGLISH, CHINESE, ENGLISH[:1] + CHINESE[:1]],
                         ids=["english", "chinese", "mixed"])
def test_query_text_matches_reference(client, reference_pipeline, texts: list[str]) -> None:
    assert_matches(embed(client, S.QUERY_TEXT, texts=texts),
                   reference_pipeline.embed(texts, None, "query"), "query_text")


def test_query_image_matches_reference(client, reference_pipeline, photos: list[bytes]) -> None:
    assert_matches(embed(client, S.QUERY_IMAGE, images=photos),
                   reference_pipeline.embed(None, photos, "query"), "query_image")


def test_query_text_image_matches_reference(client, reference_pipeline, photos: list[bytes]) -> None:
    texts = [ENGLISH[0], CHINESE[0], ENGLISH[2], CHINESE[1]]
    assert_matches(embed(client, S.QUERY_TEXT_IMAGE, texts=texts, images=photos),
                   reference_pipeline.embed(texts, photos, "query"), "query_text_image")


def test_item_matches_reference_in_passage_role(client, reference_pipeline, photos: list[bytes]) -> None:
    titles = [ENGLISH[1], CHINESE[1], ENGLISH[2], "白色帆布鞋 white canvas sneakers"]
    served = embed(client, S.ITEM, texts=titles, images=photos)
    assert_matches(served, reference_pipeline.embed(titles, photos, "passage"), "item")
    # The item ensemble's second output: the photo-side vector, from the same request path.
    served_photo = embed(client, S.ITEM, texts=titles, images=photos, output=S.PHOTO_EMBEDDING)
    reference, reference_photo = reference_pipeline.embed_items(titles, photos)
    assert_matches(served_photo, reference_photo, "item photo-side")
    np.testing.assert_allclose(served, reference, atol=1e-3)
    assert not np.allclose(served_photo, served, atol=1e-3)


def test_image_sizes_and_formats(client, reference_pipeline) -> None:
    base = photo(300, 200, seed=3)
    images = {  # RGBA PNG: see ``photos``
        "jpeg-small": encode(photo(40, 90, seed=4), "JPEG", quality=85),
        "jpeg-large-wide": encode(photo(1600, 300, seed=5), "JPEG", quality=90),
        "webp": encode(base, "WEBP", quality=80),
        "grayscale-jpeg": encode(base.convert("L"), "JPEG"),
        "palette-png": encode(base.convert("P"), "PNG"),
    }
    names, data = list(images), list(images.values())
    texts = [f"product photo {name}" for name in names]
    for model, model_texts in ((S.QUERY_IMAGE, None), (S.QUERY_TEXT_IMAGE, texts)):
        served = embed(client, model, texts=model_texts, images=data)
        reference = reference_pipeline.embed(model_texts, data, "query")
        for i, name in enumerate(names):
            assert_matches(served[i:i + 1], reference[i:i + 1], f"{model} {name}")


# ------------------------------------------------------------------- concurrency


def _concurrently(url: str, model: str, rows: list[list[grpcclient.InferInput]]) -> list[object]:
    clients = [grpcclient.InferenceServerClient(url) for _ in rows]
    barrier = threading.Barrier(len(rows))
    answers: list[object] = [None] * len(rows)

    def call(i: int) -> None:
        barrier.wait()
        try:
            answers[i] = raw_infer(clients[i], model, rows[i])
        except Exception as exc:  # noqa: BLE001 - recorded per caller
            answers[i] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(rows))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        for c in clients:
            c.close()
    return answers


def test_text_encoder_member_reads_text_or_ids(client, reference_pipeline) -> None:
    """cpu target: the text encoder member answers query TEXT with its embedding (all of
    query_text), and ids with mask (the other ensembles' path) with token states only."""
    texts = ["navy down jacket", "红色连衣裙"]
    query_text = embed(client, S.QUERY_TEXT, texts=texts)
    member = client.infer(S.TEXT_ENCODER, [bytes_tensor(S.TEXT, [t.encode() for t in texts])], client_timeout=60)
    np.testing.assert_array_equal(member.as_numpy(S.EMBEDDING), query_text)
    ids, mask = reference_pipeline.encoders.text_pre.encode(texts, "query")
    tensors = []
    for name, arr in ((S.INPUT_IDS, ids), (S.ATTENTION_MASK, mask)):
        tensors.append(grpcclient.InferInput(name, list(arr.shape), "INT64"))
        tensors[-1].set_data_from_numpy(arr)
    from_ids = client.infer(S.TEXT_ENCODER, tensors, client_timeout=60)  # no outputs named: all asked
    assert from_ids.as_numpy(S.EMBEDDING) is None
    np.testing.assert_allclose(from_ids.as_numpy(S.TOKEN_STATES), member.as_numpy(S.TOKEN_STATES), atol=1e-5)


def test_concurrent_requests_are_batched_and_answer_like_sequential(client, xm_server) -> None:
    texts = [f"{colour} {kind}" for colour in ("red", "navy", "white", "black")
             for kind in ("dress", "jacket", "boots", "scarf", "bag", "shirt", "hat", "coat")]
    assert len(texts) == 32
    sequential = np.concatenate([embed(client, S.QUERY_TEXT, texts=[t]) for t in texts])

    watched = (S.TEXT_ENCODER,)  # on the cpu target query_text is this one step
    before = {m: model_stats(client, m) for m in watched}
    answers = _concurrently(xm_server.url, S.QUERY_TEXT,
                            [[bytes_tensor(S.TEXT, [t.encode()])] for t in texts])
    after = {m: model_stats(client, m) for m in watched}

    for i, answer in enumerate(answers):
        assert isinstance(answer, np.ndarray), f"request {i}: {answer}"
        np.testing.assert_allclose(answer[0], sequential[i], atol=1e-5, err_msg=texts[i])
    for m in watched:
        inferences, executions = (a - b for a, b in zip(after[m], before[m]))
        assert inferences == 32, m
        assert executions < inferences, f"{m}: {executions} executions for 32 rows, nothing merged"


# ------------------------------------------------------------------- bad requests


def _fp32_text() -> list[grpcclient.InferInput]:
    t = grpcclient.InferInput(S.TEXT, [1, 1], "FP32")
    t.set_data_from_numpy(np.zeros((1, 1), np.float32))
    return [t]


def _fp32_pixels() -> list[grpcclient.InferInput]:
    """Normalised float pixels, as the image encoder took before it took uint8 ones."""
    t = grpcclient.InferInput(S.PIXEL_VALUES, [1, 3, 224, 224], "FP32")
    t.set_data_from_numpy(np.zeros((1, 3, 224, 224), np.float32))
    return [t]


def _wide_text() -> list[grpcclient.InferInput]:
    t = grpcclient.InferInput(S.TEXT, [1, 2], "BYTES")
    t.set_data_from_numpy(np.array([[b"red", b"dress"]], dtype=object))
    return [t]


def _ids(*names: str) -> list[grpcclient.InferInput]:
    """Token ids (and other tensors of the same shape) as the item ensemble hands them on."""
    out = []
    for name in names:
        t = grpcclient.InferInput(name, [1, 4], "INT64")
        t.set_data_from_numpy(np.ones((1, 4), np.int64))
        out.append(t)
    return out


def _truncated_jpeg() -> bytes:
    data = sample_images(1)[0]
    return data[: len(data) // 2]


def _big_png(width: int, height: int) -> bytes:
    """A grayscale PNG whose header declares ``width`` x ``height``.

    Only the first rows of pixel data follow: encoding 400 megapixels would take seconds,
    and the server must refuse on the header before it decodes a single row (a refusal
    for truncation instead of size would fail the test).
    """
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compress((b"\0" * (width + 1)) * 4)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


def _good_image() -> bytes:
    return sample_images(1)[0]


# (model, inputs factory, regex the message must match): the regex names the step that
# refused the request and the reason.
BAD_REQUESTS = {
    "empty-text": (S.QUERY_TEXT, lambda: [bytes_tensor(S.TEXT, [b""])],
                   r"text_encoder: TEXT\[0\] is empty"),
    "whitespace-text": (S.QUERY_TEXT, lambda: [bytes_tensor(S.TEXT, [b" \t\n "])],
                        r"text_encoder: TEXT\[0\] is empty"),
    "over-long-text": (S.QUERY_TEXT, lambda: [bytes_tensor(S.TEXT, [b"x" * 5000])],
                       r"text_encoder: TEXT\[0\] is 5000 bytes, over the limit"),
    "invalid-utf8": (S.QUERY_TEXT, lambda: [bytes_tensor(S.TEXT, [b"caf\xe9 \xff"])],
                     r"text_encoder: TEXT\[0\] is not valid UTF-8"),
    "item-empty-title": (S.ITEM, lambda: [bytes_tensor(S.TEXT, [b""]),
                                          bytes_tensor(S.IMAGE, [_good_image()])],
                         r"item_preprocess: TEXT\[0\] is empty"),
    "corrupt-image": (S.QUERY_IMAGE, lambda: [bytes_tensor(S.IMAGE, [b"this is not an image"])],
                      r"image_preprocess: IMAGE\[0\] is not a decodable image"),
    "truncated-jpeg": (S.QUERY_IMAGE, lambda: [bytes_tensor(S.IMAGE, [_truncated_jpeg()])],
                       r"image_preprocess: IMAGE\[0\] is a corrupt or truncated image"),
    "huge-png": (S.QUERY_IMAGE, lambda: [bytes_tensor(S.IMAGE, [_big_png(20000, 20000)])],
                 r"image_preprocess: IMAGE\[0\] (is 20000x20000 pixels|is refused, too many pixels)"),
    "over-wide-png": (S.QUERY_IMAGE, lambda: [bytes_tensor(S.IMAGE, [_big_png(12000, 100)])],
                      r"image_preprocess: IMAGE\[0\] is 12000x100 pixels, over the limit"),
    "empty-image": (S.QUERY_IMAGE, lambda: [bytes_tensor(S.IMAGE, [b""])],
                    r"image_preprocess: IMAGE\[0\] is empty"),
    "joint-corrupt-image": (S.QUERY_TEXT_IMAGE, lambda: [bytes_tensor(S.TEXT, [b"red dress"]),
                                                         bytes_tensor(S.IMAGE, [b"\x89PNG\r\n\x1a\n"])],
                            r"joint_preprocess: IMAGE\[0\] is (a corrupt|not a decodable)"),
    "bad-row-in-batch": (S.QUERY_TEXT, lambda: [bytes_tensor(S.TEXT, [b"red dress", b"", b"boots"])],
                         r"text_encoder: TEXT\[1\] is empty"),
    # The text encoder member reads either query TEXT or token ids with their mask.
    "encoder-ids-without-mask": (S.TEXT_ENCODER, lambda: _ids(S.INPUT_IDS),
                                 r"text_encoder: send TEXT, or INPUT_IDS with ATTENTION_MASK"),
    "encoder-text-and-ids": (S.TEXT_ENCODER, lambda: [bytes_tensor(S.TEXT, [b"red dress"]),
                                                      *_ids(S.INPUT_IDS, S.ATTENTION_MASK)],
                             r"text_encoder: send TEXT or INPUT_IDS, not both"),
    # Triton's own validation, before any step runs.
    "wrong-dtype": (S.QUERY_TEXT, _fp32_text, r"input 'TEXT' data-type is 'FP32', but model "
                                              r"'query_text' expects 'BYTES'"),
    "float-pixels": (S.IMAGE_ENCODER, _fp32_pixels, r"input 'PIXEL_VALUES' data-type is 'FP32', but "
                                                    r"model 'image_encoder' expects 'UINT8'"),
    "wrong-shape": (S.QUERY_TEXT, _wide_text, r"unexpected shape for input 'TEXT' for model "
                                              r"'query_text'. Expected \[-1,1\], got \[1,2\]"),
    "batch-33": (S.QUERY_TEXT, lambda: [bytes_tensor(S.TEXT, [b"dress"] * 33)],
                 r"batch-size must be <= 32 for 'query_text'"),
    "missing-input": (S.QUERY_TEXT_IMAGE, lambda: [bytes_tensor(S.TEXT, [b"red dress"])],
                      r"model 'query_text_image'.*missing required input\(s\) \['IMAGE'\]"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_is_rejected_naming_step_and_reason(client, case: str) -> None:
    model, make_inputs, message = BAD_REQUESTS[case]
    err = rejection(client, model, make_inputs())
    assert err.status() == INVALID, f"{case}: {err.status()} {err.message()}"
    assert re.search(message, err.message()), f"{case}: {err.message()}"


def test_server_healthy_after_every_bad_request(client, reference_pipeline) -> None:
    for case, (model, make_inputs, _) in BAD_REQUESTS.items():
        assert rejection(client, model, make_inputs()).status() == INVALID, case
    assert client.is_server_live() and client.is_server_ready()
    for model in (*S.served_member_specs(S.Dims(384, 1800), text_queries=True), *S.ENSEMBLES):  # the cpu target
        assert client.is_model_ready(model), model
    texts = ["red dress", "boots"]
    assert_matches(embed(client, S.QUERY_TEXT, texts=texts),
                   reference_pipeline.embed(texts, None, "query"), "query_text after bad requests")
    image = sample_images(1)[0]
    assert_matches(embed(client, S.QUERY_IMAGE, images=[image]),
                   reference_pipeline.embed(None, [image], "query"), "query_image after bad requests")


def test_bad_request_fails_alone_among_concurrent_good_ones(client, xm_server, reference_pipeline) -> None:
    image = sample_images(2)[1]
    rows = [[bytes_tensor(S.IMAGE, [image])] for _ in range(8)]
    rows[3] = [bytes_tensor(S.IMAGE, [b"GIF89a broken"])]
    answers = _concurrently(xm_server.url, S.QUERY_IMAGE, rows)
    bad = answers.pop(3)
    assert isinstance(bad, InferenceServerException) and bad.status() == INVALID, bad
    assert "image_preprocess: IMAGE[0]" in bad.message()
    expected = reference_pipeline.embed(None, [image], "query")
    for answer in answers:
        assert isinstance(answer, np.ndarray), answer
        assert_matches(answer, expected, "good request sent with a bad one")


@pytest.mark.slow
def test_refused_two_input_requests_leave_the_server_whole(start_triton, exported_repository,
                                                           reference_pipeline) -> None:
    """Hundreds of refused item / text+image requests among good ones, from two threads.

    Regression test: when the two-input ensembles ran the tokenizer and the image step as
    parallel branches, about one refusal in two hundred crashed tritonserver 2.51, hung it,
    or corrupted another request's tensors (see xmsearch.spec.ensemble_specs).  Here every
    refusal names its step, every good answer matches the reference, and the server lives.
    Private server: a regression must not take the shared one down with it.
    """
    title, image = "blue down jacket", sample_images(1)[0]
    expected = reference_pipeline.embed([title], [image], "passage")
    bad_rows = {S.ITEM: ("item_preprocess: IMAGE[0]", [b"red cap", b"\xff\xd8\xff broken jpeg"]),
                S.QUERY_TEXT_IMAGE: ("joint_preprocess: IMAGE[0]", [b"in red", b"not an image"])}
    problems: list[str] = []

    def hammer(url: str, rounds: int) -> None:
        client = grpcclient.InferenceServerClient(url)
        try:
            for i in range(rounds):
                model = (S.ITEM, S.QUERY_TEXT_IMAGE)[i % 2]
                step, (text, photo_bytes) = bad_rows[model]
                try:
                    raw_infer(client, model, [bytes_tensor(S.TEXT, [text]), bytes_tensor(S.IMAGE, [photo_bytes])])
                    problems.append(f"round {i}: {model} accepted a corrupt image")
                except InferenceServerException as e:
                    if e.status() != INVALID or step not in e.message():
                        problems.append(f"round {i}: {model}: {e.status()} {e.message()}")
                good = raw_infer(client, S.ITEM, [bytes_tensor(S.TEXT, [title.encode()]),
                                                  bytes_tensor(S.IMAGE, [image])])
                if float(np.sum(good * expected)) < MIN_COSINE:
                    problems.append(f"round {i}: good item answered a different vector")
        except Exception as e:  # noqa: BLE001 - the server died or hung: report it
            problems.append(f"{type(e).__name__}: {e}")
        finally:
            client.close()

    with start_triton(exported_repository) as server:
        threads = [threading.Thread(target=hammer, args=(server.url, 150)) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert not any(t.is_alive() for t in threads), "requests still pending after 300 s"
        assert not problems, problems[:5]
        assert server.is_running(), f"tritonserver exited:\n{server.log_excerpt()}"


@pytest.mark.slow
def test_lone_rows_and_split_runs_answer_alike(start_triton, exported_repository, tmp_path,
                                              reference_pipeline, photos: list[bytes]) -> None:
    """``xmsearch export --ort-spinning single``: the ONNX members run batches of one row in a
    second session sharing the weights; here up to two rows go there (``spin_max_rows`` 2), so
    single, two-row and larger requests cross both sessions of every member; and batches of
    more than three rows run as several runs (``max_rows_per_run`` 3, the image encoder's is 8
    as exported).  All must give the reference's vectors."""
    from xmsearch.export.repository import NEURAL, read_repository, write_config

    repo = tmp_path / "repository"
    shutil.copytree(exported_repository, repo)
    members = 0
    for name, cfg in read_repository(repo).items():
        if "spin_max_rows" in cfg.parameters:
            assert cfg.parameters["max_rows_per_run"].string_value == ("8" if name == S.IMAGE_ENCODER else "0")
            cfg.parameters["spin_max_rows"].string_value = "2"
            cfg.parameters["max_rows_per_run"].string_value = "3"
            write_config(cfg, repo / name)
            members += 1
    assert members == len(NEURAL)
    texts = [ENGLISH[0], CHINESE[0], ENGLISH[2], CHINESE[1]]
    with start_triton(repo) as server:
        lone = grpcclient.InferenceServerClient(server.url)
        try:
            for n in (1, 2, 4):
                assert_matches(embed(lone, S.QUERY_TEXT, texts=texts[:n]),
                               reference_pipeline.embed(texts[:n], None, "query"), f"query_text x{n}")
                assert_matches(embed(lone, S.QUERY_TEXT_IMAGE, texts=texts[:n], images=photos[:n]),
                               reference_pipeline.embed(texts[:n], photos[:n], "query"), f"query_text_image x{n}")
                assert_matches(embed(lone, S.ITEM, texts=texts[:n], images=photos[:n]),
                               reference_pipeline.embed(texts[:n], photos[:n], "passage"), f"item x{n}")
        finally:
            lone.close()
