"""Engine stages and generation on the CPU: incremental decode against full recompute,
batches against their prompts one by one, stopping rules, streaming, input errors."""


import pytest
import torch

from deepseek_fp4_plugin import DeepseekInference, Engine
from deepseek_fp4_plugin.tiny import make_tiny
from tiny_reference import TinyModel

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def rel_err(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=3)


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return Engine.from_pretrained(tiny_dir, device="cpu")


@pytest.fixture(scope="module")
def id_engine():
    """A tiny model with no tokenizer (prompts are token ids), larger logit margins."""
    ckpt, _ = TinyModel.build(seed=21).checkpoint("nvfp4")
    return Engine.from_pretrained(ckpt, device="cpu", max_seq_len=96, max_batch_size=3)


def rand_ids(seed, n, vocab=256):
    return torch.randint(2, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# ---- stages ----------------------------------------------------------------------------

@pytest.mark.parametrize("chunk", [64, 5])
def test_incremental_decode_equals_full_recompute(chunk):
    """prefill (naive MLA, chunked or not) + decode_one_token (absorbed MLA from the compressed
    cache) give the logits that one cache-free pass over the whole sequence gives."""
    ckpt, _ = TinyModel.build(seed=22).checkpoint("nvfp4")
    eng = Engine.from_pretrained(ckpt, device="cpu", max_seq_len=64, prefill_chunk=chunk)
    seq = rand_ids(5, 30)
    full = eng.logits(seq)                                                       # [30, V]
    p = 11
    got = [eng.prefill(torch.tensor([seq[:p]]), [p])[0]]
    for i in range(p, len(seq) - 1):
        got.append(eng.decode_one_token(torch.tensor([seq[i]]), torch.tensor([i]), kv_len=i + 1)[0])
    got = torch.stack(got)                                                       # [30 - p, V]
    assert rel_err(got, full[p - 1:-1]) <= 1e-4


def test_batch_prefill_and_decode_match_single_sequences(id_engine):
    """Right-padded prompts of different lengths: each row of a batch equals that prompt alone."""
    prompts = [rand_ids(s, n) for s, n in ((1, 5), (2, 13), (3, 9))]
    lengths = [len(p) for p in prompts]
    padded = torch.zeros(3, 13, dtype=torch.long)
    for b, p in enumerate(prompts):
        padded[b, : len(p)] = torch.tensor(p)
    batch = id_engine.prefill(padded, lengths)                                   # [3, V]
    nxt = batch.argmax(-1)
    step = id_engine.decode_one_token(nxt, torch.tensor(lengths), kv_len=max(lengths) + 1)
    for b, p in enumerate(prompts):
        alone = id_engine.logits(p + [int(nxt[b])])
        assert rel_err(batch[b], alone[-2]) <= 1e-4
        assert rel_err(step[b], alone[-1]) <= 1e-4


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=0.8, top_p=0.9, top_k=50, seed=7)])
def test_generate_batch_equals_one_by_one(id_engine, sampling):
    prompts = [rand_ids(s, n) for s, n in ((4, 3), (5, 17), (6, 8), (7, 11))]   # 4 > max_batch_size
    batch = id_engine.generate(prompts, max_tokens=10, ignore_eos=True, **sampling)
    assert isinstance(batch, list) and len(batch) == 4
    for i, p in enumerate(prompts):
        kw = dict(sampling)
        if "seed" in kw:
            kw["seed"] += i   # prompt i of a list samples with seed + i
        alone = id_engine.generate(p, max_tokens=10, ignore_eos=True, **kw)
        assert alone.token_ids == batch[i].token_ids
        assert batch[i].prompt_tokens == len(p)


def test_greedy_generation_follows_logits(id_engine):
    """Each greedy token is the argmax of a full recompute over the sequence so far."""
    prompt = rand_ids(8, 7)
    out = id_engine.generate(prompt, max_tokens=8, ignore_eos=True)
    logits = id_engine.logits(prompt + out.token_ids)
    assert logits[len(prompt) - 1:-1].argmax(-1).tolist() == out.token_ids


def test_logits_runs_ids_as_given(engine):
    ids = engine.tokenizer.encode("Hello there", add_bos=False)
    out = engine.logits(ids)
    assert out.shape == (len(ids), engine.config.vocab_size) and out.dtype == torch.float32
    with_bos = engine.logits([engine.tokenizer.bos_token_id] + ids)
    assert with_bos.shape[0] == len(ids) + 1
    assert not torch.allclose(out[-1], with_bos[-1])
    assert rel_err(out[-1], engine.prefill(torch.tensor([ids]), [len(ids)])[0]) <= 1e-5


# ---- stopping --------------------------------------------------------------------------

def test_max_tokens(id_engine):
    out = id_engine.generate(rand_ids(9, 5), max_tokens=7, ignore_eos=True)
    assert len(out.token_ids) == 7 and out.finish_reason == "length"


def test_context_full_ends_with_length(id_engine):
    prompt = rand_ids(10, 90)
    out = id_engine.generate(prompt, max_tokens=50, ignore_eos=True)
    assert len(prompt) + len(out.token_ids) == id_engine.max_seq_len
    assert out.finish_reason == "length"


def test_eos_and_stop_token_ids(id_engine):
    prompt = rand_ids(11, 6)
    free = id_engine.generate(prompt, max_tokens=12, ignore_eos=True).token_ids
    target = free[4]
    first = free.index(target)
    by_id = id_engine.generate(prompt, max_tokens=12, stop_token_ids=[target], ignore_eos=True)
    assert by_id.token_ids == free[:first] and by_id.finish_reason == "stop"
    saved = id_engine.eos_token_ids
    try:
        id_engine.eos_token_ids = {target}
        by_eos = id_engine.generate(prompt, max_tokens=12)
        assert by_eos.token_ids == free[:first] and by_eos.finish_reason == "eos"
        assert id_engine.generate(prompt, max_tokens=12, ignore_eos=True).token_ids == free
    finally:
        id_engine.eos_token_ids = saved


def test_stop_strings(engine):
    free = engine.generate("The sea is", max_tokens=24, ignore_eos=True)
    text = free.text
    assert len(text) > 8
    stop = text[5:8]
    cut = text.find(stop)
    out = engine.generate("The sea is", max_tokens=24, ignore_eos=True, stop=[stop, "\x00never\x00"])
    assert out.text == text[:cut] and out.finish_reason == "stop"
    assert len(out.token_ids) <= len(free.token_ids)


@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.9, seed=3, top_k=40),
                                dict(stop=["e", "th"], temperature=0.7, seed=5)])
def test_stream_equals_generate(engine, kw):
    full = engine.generate("Good morning", max_tokens=20, ignore_eos=True, **kw)
    pieces = list(engine.stream("Good morning", max_tokens=20, ignore_eos=True, **kw))
    assert "".join(pieces) == full.text
    assert engine.last_completion.token_ids == full.token_ids
    if not kw.get("stop"):
        assert full.text == engine.tokenizer.decode(full.token_ids)


def test_stream_holds_back_a_possible_stop_string(engine):
    text = engine.generate("Numbers", max_tokens=16, ignore_eos=True).text
    stop = text[6:9] + "\x01"    # begins like the text, never completes
    pieces = list(engine.stream("Numbers", max_tokens=16, ignore_eos=True, stop=stop))
    assert "".join(pieces) == text


def test_chat_template(engine):
    tok = engine.tokenizer
    ids = tok.encode_chat("Hi")
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.decode(ids, skip_special_tokens=False) == tok.apply_chat_template("Hi")
    out = engine.generate("Hi", chat=True, max_tokens=4, ignore_eos=True)
    assert out.prompt_tokens == len(ids)
    plain = tok.encode("Hi")
    assert plain[0] == tok.bos_token_id and plain.count(tok.bos_token_id) == 1


def test_stats(engine):
    engine.generate(["a", "bb"], max_tokens=5, ignore_eos=True)
    s = engine.last_stats
    assert s.batch_size == 2 and s.generated_tokens == 10 and s.decode_steps == 4
    assert s.prefill_tokens_per_s > 0 and s.decode_tokens_per_s > 0


# ---- bad input -------------------------------------------------------------------------

@pytest.mark.parametrize("kw,word", [
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(seed=-3), "seed"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=True), "max_tokens"),
    (dict(stop=""), "stop"),
    (dict(stop=[1, 2]), "stop"),
    (dict(stop_token_ids=[10 ** 6]), "stop_token_ids"),
])
def test_bad_generation_arguments(engine, kw, word):
    with pytest.raises(ValueError, match=word):
        engine.generate("Hello", **kw)


def test_bad_prompts(engine, id_engine):
    with pytest.raises(ValueError, match="max_seq_len"):
        engine.generate("word " * 3000)
    with pytest.raises(ValueError, match="max_seq_len"):
        id_engine.generate(rand_ids(1, 96))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.generate([5, 999999])
    with pytest.raises(ValueError, match="empty"):
        engine.logits([])
    with pytest.raises(ValueError, match="prompt"):
        engine.generate([])
    with pytest.raises(ValueError, match="tokenizer"):
        id_engine.generate("text needs a tokenizer")
    with pytest.raises(ValueError, match="tokenizer"):
        id_engine.generate([5, 6], stop="x")
    with pytest.raises(ValueError, match="token_ids"):
        engine.logits([1.5, 2.0])
    with pytest.raises(ValueError, match="token_ids"):
        engine.logits(None)
    with pytest.raises(ValueError, match="token_ids"):
        engine.logits(7)
    with pytest.raises(ValueError, match="max_seq_len"):
        engine.logits(list(range(3)) * 1000)


def test_bad_engine_arguments(tiny_dir):
    with pytest.raises(ValueError, match="device"):
        Engine.from_pretrained(tiny_dir, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            Engine.from_pretrained(tiny_dir, device="cuda")
    with pytest.raises(ValueError, match="memory_limit"):
        Engine.from_pretrained(tiny_dir, device="cpu", memory_limit=0.001)
    with pytest.raises(ValueError, match="memory_limit"):
        Engine.from_pretrained(tiny_dir, device="cpu", memory_limit=-2)
    with pytest.raises(ValueError, match="max_seq_len"):
        Engine.from_pretrained(tiny_dir, device="cpu", max_seq_len=10 ** 6)
    with pytest.raises(ValueError, match="dtype"):
        Engine.from_pretrained(tiny_dir, device="cpu", dtype="float8")
    with pytest.raises(ValueError, match="precision"):
        Engine.from_pretrained(tiny_dir, device="cpu", precision="int3")
    with pytest.raises(FileNotFoundError):
        Engine.from_pretrained(tiny_dir / "missing", device="cpu")


def test_cuda_graph_flag_ignored_on_cpu(tiny_dir):
    with pytest.warns(UserWarning, match="use_cuda_graph"):
        eng = Engine.from_pretrained(tiny_dir, device="cpu", use_cuda_graph=True)
    assert eng.use_cuda_graph is False
    assert eng.generate("Hi", max_tokens=3, ignore_eos=True).token_ids


def test_memory_limit_that_fits(tiny_dir):
    eng = Engine.from_pretrained(tiny_dir, device="cpu", memory_limit=1.0)
    assert eng.store.memory_report()["total"] < 1 << 30


# ---- the three stored forms of the tiny model ---------------------------------------

def test_tiny_forms_load_and_agree(tmp_path, engine):
    """make-tiny's NVFP4, FP8-block and BF16 folders (same seed) through the safetensors
    loader: each runs, and their logits differ by quantization error (FP4 weights are ~10%
    off, so tens of percent in logits), far less than another seed's model differs."""
    ids = engine.tokenizer.encode("The small model")
    logits = {}
    for fmt in ("bf16", "fp8_block", "nvfp4"):
        eng = Engine.from_pretrained(make_tiny(tmp_path / fmt, seed=3, format=fmt), device="cpu")
        logits[fmt] = eng.logits(ids)                                            # [T, V]
    other_dir = make_tiny(tmp_path / "other", seed=4, format="bf16")
    other = Engine.from_pretrained(other_dir, device="cpu").logits(ids)
    assert torch.equal(logits["nvfp4"], engine.logits(ids))

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    unrelated = rel(other, logits["bf16"])
    assert unrelated > 1.0
    assert rel(logits["fp8_block"], logits["bf16"]) < 0.4 * unrelated
    assert rel(logits["nvfp4"], logits["bf16"]) < 0.4 * unrelated


# ---- the facade ------------------------------------------------------------------------

def test_deepseek_inference_facade(tiny_dir):
    model = DeepseekInference(tiny_dir, device="cpu", memory_limit=2, verbose=False)
    model.set_memory_config(prefetch_layers=2, max_gpu_layers=4, expert_threshold=0.1)
    model.set_memory_strategy({"cpu_cache_size": 1, "min_layers": 1, "max_experts": 32})
    model.set_compute_streams({"prefetch": True, "compute": True, "transfer": True})
    assert model.settings["memory_config"] == {"prefetch_layers": 2, "max_gpu_layers": 4, "expert_threshold": 0.1}
    # everything fits in 2 GiB: the paging knobs have nothing to act on and say so
    assert model.pending_settings()["memory_config"] == {"prefetch_layers": 2, "expert_threshold": 0.1}
    with pytest.raises(ValueError, match="expert_threshold"):
        model.set_memory_config(expert_threshold=1.5)
    with pytest.raises(ValueError, match="max_gpu_layers"):
        model.set_memory_config(max_gpu_layers=0)
    with pytest.raises(ValueError, match="bogus"):
        model.set_memory_strategy({"bogus": 1})
    with pytest.raises(ValueError, match="transfer"):
        model.set_compute_streams({"transfer": "yes"})
    with pytest.raises(ValueError, match="sliding_window"):
        model.apply_config({"sliding_window": 4096})
    with pytest.raises(ValueError, match="expert_parallelism.*grouped GEMM"):
        model.apply_config({"expert_parallelism": 8})
    with pytest.raises(ValueError, match="unknown"):
        model.apply_config({"turbo": True})
    with pytest.raises(ValueError, match="too small"):
        model.set_memory_strategy({"gpu_reserved": 2})        # nothing left of a 2 GiB budget
    model.set_memory_strategy({"gpu_reserved": 0})
    cfg = model.optimize_for_single_task()
    assert cfg["use_cuda_graph"] is False and model.engine.max_batch_size == 1 and cfg["expert_threshold"] == 0
    text = model.generate("请介绍一下", max_tokens=5, temperature=0.7, seed=1)
    assert isinstance(text, str)
    assert text == model.engine.generate("请介绍一下", max_tokens=5, temperature=0.7, seed=1).text
    assert "".join(model.stream("Hello", max_tokens=5, temperature=0.0)) == model.generate(
        "Hello", max_tokens=5, temperature=0.0)
    assert model.stats.generated_tokens <= 5
