"""Benchmark exported KV-cache programs against eager PyTorch, on random-weight Gemma 3n models of
the real architecture (gemma3n_executorch/architectures/), in one run on one machine.

    python bench.py --variant e2b [--layers N] [--configs LIST] [--prompt-len 128] [--new-tokens 128]
                    [--repeats 3] [--json OUT.json] [--model tiny]

A configuration is a name made of export options joined by '-': a backend (portable, xnnpack),
a dtype (fp32, bf16), a linear scheme (int8, 8da4w), an embedding scheme (emb8w, emb4w), a
group size (g32), a KV cache precision (kvfp32, kvint8), the full-attention kernel (attnexecutorch,
attngemma3n), the positions the cache holds (ctx4096)
and the tokens one call takes (chunk256); quantization not named is off (the KV cache fp32), the dtype defaults to
fp32, the backend to what the quantization needs (xnnpack for 8da4w and quantized embeddings,
else portable), the lengths to --max-context-length and --max-seq-length. 'phone' is the --mode
kv default recipe, and a name starting 'phone-' overrides some of it ('phone-kvfp32').
With no --configs: the eager baselines and 'phone'.

Long context: --long-prompt N also times one prefill of N tokens (in calls of the program's
max_seq_length), and --depths D1,D2,... the decode speed after D tokens in the cache (programs
and llama.cpp, whose llama-bench -d fills its cache the same way; not eager). Each run records
this machine's memory read bandwidth (a short probe), so decode can be set against its floor.
'llamacpp-q4_0' is the peer: llama.cpp's Q4_0 of the same weights, timed by llama-bench (needs
--llama-cpp, a llama.cpp tree with its tools built, and the full-depth random model).
'litertlm-int8' and 'litertlm-int4' are Google's LiteRT-LM on the same weights, converted by
litert-torch and timed by LiteRT-LM's benchmark (need --litert-lm, an environment with LiteRT's
tools; any depth whose conversion fits in memory); its API gives out tokens, not logits, so its
records have top-1 agreement and no relative L2 (docs/benchmarks.md).

--keep-programs keeps the programs in --work-dir and reuses them in a later run of the same commit
and arguments; with --export-only a run only exports (so exports can run while the machine is
busy, and the timing later, alone: the export records then say what they were measured beside).

Memory as a phone app pays it: --memory-probe also runs every program through ExecuTorch's stock
runner (TextLLMRunner), as it loads it and with the random-access advice the README gives apps,
and through this project's runtime, each in a process that cannot mlock (as an Android app
cannot), on a prompt of --probe-prompt random ids over the whole vocabulary (default: the context
less --new-tokens) with --new-tokens decoded after it; each record gets a "memory" entry per
probe (gemma3n_executorch/memory_probe.py says what is measured, docs/make_memory.py tables it).

Every export and every measurement runs in its own process, so peak memory is its own. Each
record: pte_bytes, load_s, prefill_tok_s (the mean of --repeats warm prefills, as llama-bench
times them), prefill_first_tok_s and ttft_s (the first prefill after loading), decode_tok_s, run_peak_rss_bytes,
export_peak_rss_bytes, export_s, and the logit error against eager fp32 on the same tokens
(teacher-forced: relative L2 and top-1 agreement). Eager baselines (``eager-fp32``,
``eager-bf16``) run the Hugging Face model with its own KV cache, on the same weights. For
llama.cpp, pte_bytes is the .gguf's size, and load time and logit error are not measured.
"""
