"""SNAC decoder parity with the `snac` package (random weights, randomised Snake alphas and weight-norm gains)."""

import json

import numpy as np
import pytest

from conftest import require

torch = require("torch")
snac = require("snac")

from maxjax.architectures.snac import SnacConfig, decode  # noqa: E402
from maxjax.pipelines import orpheus  # noqa: E402
from maxjax.runtime.snac_decoder import SnacDecoder  # noqa: E402
from maxjax.weights.snac import load_snac, params_from_torch_state, restore_params, save_params  # noqa: E402

pytestmark = pytest.mark.slow

CONFIG_24KHZ = dict(
    sampling_rate=24000, encoder_dim=48, encoder_rates=[2, 4, 8, 8], decoder_dim=1024, decoder_rates=[8, 8, 4, 2],
    attn_window_size=None, codebook_size=4096, codebook_dim=8, vq_strides=[4, 2, 1], noise=True, depthwise=True,
)
REL_TOL = 1e-4


@pytest.fixture(scope="module")
def reference():
    """The reference 24 kHz model with randomised weights and noise off, its state dict and maxjax params."""
    mp = pytest.MonkeyPatch()
    mp.setattr(snac.layers.NoiseBlock, "forward", lambda self, x: x)
    torch.manual_seed(0)
    model = snac.SNAC(**CONFIG_24KHZ).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("alpha"):
                p.uniform_(0.5, 2.0)
            elif name.endswith("original0"):  # weight-norm gain g
                p.mul_(torch.empty_like(p).uniform_(0.3, 2.0))
            elif name.endswith("bias"):
                p.uniform_(-0.1, 0.1)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    cfg = SnacConfig.from_dict(CONFIG_24KHZ)
    yield model, state, cfg, params_from_torch_state(state, cfg)
    mp.undo()


def _random_codes(rng, batch, frames, cfg):
    return [rng.integers(0, cfg.codebook_size, (batch, n)).astype(np.int32) for n in cfg.level_steps(frames)]


def _ref_decode(model, codes):
    with torch.no_grad():
        return model.decode([torch.from_numpy(np.asarray(c)).long() for c in codes]).numpy()


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_config_defaults_and_from_dict():
    cfg = SnacConfig()
    assert cfg == SnacConfig.from_dict(CONFIG_24KHZ)
    assert (cfg.latent_dim, cfg.hop_length, cfg.samples_per_frame) == (768, 512, 2048)
    assert cfg.level_steps(3) == (3, 6, 12)
    hash(cfg)
    with pytest.raises(ValueError, match="bogus"):
        SnacConfig.from_dict({**CONFIG_24KHZ, "bogus": 1})
    with pytest.raises(ValueError, match="attn_window_size"):
        SnacConfig.from_dict({**CONFIG_24KHZ, "attn_window_size": 32})


def test_decode_matches_reference(reference):
    model, _, cfg, params = reference
    codes = _random_codes(np.random.default_rng(1), 2, 5, cfg)
    expected = _ref_decode(model, codes)  # [2, 1, 5 * 2048]
    got = np.asarray(decode(params, cfg, codes))
    assert got.shape == expected.shape == (2, 1, 5 * 2048)
    err = _rel(got, expected)
    print(f"SNAC decode relative error (f32): {err:.2e}")
    assert err <= REL_TOL


def test_bucket_padding_is_exact(reference):
    """Rows of different lengths padded into one bucket decode as each would alone (masked convolutions)."""
    model, _, cfg, params = reference
    decoder = SnacDecoder(params, cfg, frame_buckets=(8,), batch_buckets=(4,))
    rng = np.random.default_rng(2)
    codes = _random_codes(rng, 3, 5, cfg)
    lengths = np.array([5, 3, 1])
    audio = decoder.decode_frames(codes, num_frames=lengths)  # [3, 5 * 2048]
    assert audio.shape == (3, 5 * 2048)
    for row, n in enumerate(lengths):
        alone = [c[row : row + 1, :steps] for c, steps in zip(codes, cfg.level_steps(n))]
        expected = _ref_decode(model, alone)[0, 0]
        assert _rel(audio[row, : n * 2048], expected) <= REL_TOL
        assert not audio[row, n * 2048 :].any()
    # A clip longer than one bucket step, in another call: no new program for the same bucket.
    more = _random_codes(rng, 1, 7, cfg)
    assert _rel(decoder.decode_frames(more)[0], _ref_decode(model, more)[0, 0]) <= REL_TOL
    assert decoder.compile_count == 1
    with pytest.raises(ValueError, match="num_frames"):
        decoder.decode_frames(_random_codes(rng, 1, 9, cfg))
    with pytest.raises(ValueError, match=r"codes\[2\]"):
        decoder.decode_frames([codes[0], codes[1], codes[2][:, :-1]])


def test_warmup_compiles_every_bucket_once(reference):
    _, _, cfg, params = reference
    decoder = SnacDecoder(params, cfg, frame_buckets=(4, 8), batch_buckets=(1, 2))
    assert decoder.warmup() == 3  # (1, 4), (1, 8), (2, 4)
    rng = np.random.default_rng(3)
    decoder.decode_frames(_random_codes(rng, 2, 3, cfg))
    decoder.decode_frames(_random_codes(rng, 1, 6, cfg))
    decoder.decode_frames(_random_codes(rng, 3, 2, cfg))  # split into a batch of 2 and a batch of 1
    assert decoder.compile_count == 3


def _reference_stream(model, token_strings):
    """The Orpheus reference `tokens_decoder` + `convert_to_audio` (float slices, before int16), one token at a time."""
    buffer, count, chunks = [], 0, []
    for text in token_strings:
        start = text.rfind("<custom_token_")
        if start == -1 or not text.endswith(">"):
            continue
        token = int(text[start + 14 : -1]) - 10 - (count % 7) * 4096
        if token > 0:
            buffer.append(token)
            count += 1
            if count % 7 == 0 and count > 27:
                window = buffer[-28:]
                c0 = [window[7 * j] for j in range(4)]
                c1 = [window[7 * j + k] for j in range(4) for k in (1, 4)]
                c2 = [window[7 * j + k] for j in range(4) for k in (2, 3, 5, 6)]
                if any(c < 0 or c > 4096 for c in c0 + c1 + c2):
                    chunks.append(None)
                    continue
                chunks.append(_ref_decode(model, [np.array([c]) for c in (c0, c1, c2)])[0, 0, 2048:4096])
    return chunks


def test_streaming_matches_reference_sliding_window(reference):
    model, _, cfg, params = reference
    vocab = orpheus.OrpheusVocab.default()
    rng = np.random.default_rng(4)
    frames = rng.integers(1, 4096, (9, 7))
    frames[2, 3] = 0  # dropped by the reference (code > 0 test): shifts every later position
    ids = (vocab.audio_token_offset + frames + np.arange(7) * 4096).reshape(-1).tolist()
    ids.insert(10, 791)  # a text token: skipped
    ids.insert(30, vocab.end_of_human)  # a marker (negative code): skipped
    ids.append(vocab.end_of_speech)
    strings = [f"<custom_token_{t - vocab.custom_token_base}>" if t >= vocab.custom_token_base else "the" for t in ids]
    expected = _reference_stream(model, strings)

    parser = orpheus.AudioTokenParser(vocab, drop_zero_codes=True)
    parser.push(ids)
    parsed = parser.frames()
    decoder = SnacDecoder(params, cfg, frame_buckets=(4,), batch_buckets=(8,))
    got = orpheus.stream_window_audio(decoder, vocab, parsed, 3, len(parsed))
    assert len(got) == len(expected) == len(parsed) - 3 >= 3
    assert [g is None for g in got] == [e is None for e in expected]
    assert any(e is None for e in expected) and any(e is not None for e in expected)
    for g, e in zip(got, expected):
        if e is not None:
            assert g.shape == (2048,) and _rel(g, e) <= REL_TOL
    assert decoder.compile_count == 1


def test_load_snac_directory_and_orbax_roundtrip(reference, tmp_path):
    from safetensors.numpy import save_file

    _, state, cfg, params = reference
    (tmp_path / "config.json").write_text(json.dumps(CONFIG_24KHZ))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="pickle"):
        load_snac(tmp_path)
    # Older checkpoints name the weight-norm tensors weight_g / weight_v.
    legacy = {k.replace("parametrizations.weight.original0", "weight_g").replace("parametrizations.weight.original1",
                                                                                   "weight_v"): v for k, v in state.items()}
    save_file({k: np.ascontiguousarray(v) for k, v in legacy.items()}, str(tmp_path / "model.safetensors"))
    loaded, loaded_cfg = load_snac(tmp_path)
    assert loaded_cfg == cfg
    w0, w1 = loaded["decoder"]["blocks"][2]["up"]["w"], params["decoder"]["blocks"][2]["up"]["w"]
    np.testing.assert_array_equal(np.asarray(w0), np.asarray(w1))

    save_params(loaded, tmp_path / "orbax")
    restored = restore_params(tmp_path / "orbax")
    np.testing.assert_array_equal(np.asarray(restored["decoder"]["out_conv"]["w"]),
                                  np.asarray(params["decoder"]["out_conv"]["w"]))


def test_noise_block_matches_reference_formula(reference):
    """With noise on, each block adds n * (W x), n ~ N(0, 1) per (row, step); checked with the same noise draw."""
    import jax

    from maxjax.architectures.snac import noise_block

    model, _, cfg, params = reference
    x = np.random.default_rng(5).standard_normal((2, 16, 512)).astype(np.float32)  # [B, T, C]
    key = jax.random.key(0)
    got = np.asarray(noise_block(x, params["decoder"]["blocks"][0]["noise"], key))
    noise = np.asarray(jax.random.normal(key, (2, 16, 1), np.float32))
    linear = model.decoder.model[2].block[2].linear
    with torch.no_grad():
        h = linear(torch.from_numpy(x).transpose(1, 2)).transpose(1, 2).numpy()
    assert _rel(got, x + noise * h) <= REL_TOL
    codes = _random_codes(np.random.default_rng(6), 1, 2, cfg)
    quiet = np.asarray(decode(params, cfg, codes))
    noisy = np.asarray(decode(params, cfg, codes, noise_key=key))
    assert _rel(noisy, quiet) > 1e-3
    np.testing.assert_array_equal(noisy, np.asarray(decode(params, cfg, codes, noise_key=key)))
