"""The offline engine benchmark behind ``mtpserve bench`` (options in cli/bench.py). Prompt
processing and single-stream decode with MTP off, fixed k and adaptive, acceptance per draft
position and prompt kind, the verify-cost curve, a concurrency sweep, memory, HF transformers on
the same model and prompts, llama.cpp's llama-bench on the same GGUF file, and decode on JSON prompts
with and without a schema (bench/schema_bench.py), and acceptance alone over a whole prompt set in
one batch (bench/acceptance_bench.py)."""

from __future__ import annotations

import datetime
import importlib.util
import os
import platform
import sys

import torch
from tqdm import tqdm

from mtpserve import __version__
from mtpserve.bench import acceptance_bench, engine_runs, llama_cpp, quality, schema_bench, verify_cost
from mtpserve.bench.engine_runs import OFF, adaptive, fixed
from mtpserve.bench.hf_compare import compare, load_hf
from mtpserve.engine.loader.mtp_head import default_head_path

SECTIONS = ("pp", "decode", "verify", "quality", "concurrency", "hf", "llamacpp", "schema",
            "acceptance")


def skip_hf_without_transformers(sections: list[str]) -> dict | None:
    """Drop the "hf" section when transformers is not installed;
    what the results say in its place."""
    if "hf" in sections and importlib.util.find_spec("transformers") is None:
        sections.remove("hf")
        return {"skipped": "transformers is not installed"}
    return None


def skip_sections(args) -> dict[str, dict]:
    """Drop the sections that cannot run here (the peers': no transformers, no llama-bench or no
    GGUF file; the schema section: a prompts file without schemas); per section dropped, what the
    results say in its place."""
    skipped = {}
    hf = skip_hf_without_transformers(args.sections)
    if hf:
        skipped["hf"] = hf
    llamacpp = llama_cpp.skip_without_llama_bench(args.sections, args.llama_bench, args.model)
    if llamacpp:
        skipped["llamacpp"] = llamacpp
    schema = schema_bench.skip_without_schemas(args.sections, args.prompts)
    if schema:
        skipped["schema"] = schema
    return skipped


def head_label(path: str | None) -> str | None:
    """How results name a head: the shipped one by its place in the package, others as given."""
    if path and os.path.abspath(path) == default_head_path():
        return "heads/smollm2-135m-instruct (shipped)"
    return path


def describe_mtp(engine, args) -> dict:
    if engine.mtp is None:
        description = ("no MTP head (the model has no MTP layers and no --mtp-head was given): "
                       "MTP off only")
        return {"available": False, "description": description}
    layers = len(engine.mtp.layers)
    head = head_label(engine.config.mtp_head)
    source = f"head {head}" if head else "the model's own layers"
    description = f"{layers} MTP layer(s) from {source}"
    return {"available": True, "num_layers": layers, "description": description}


def plan(args, mtp_available: bool, num_prompts: int,
         num_schema_prompts: int = 0) -> tuple[dict, int]:
    """The modes of each section, and how many runs they make (for the progress bar)."""
    pp_modes = {"mtp_off": OFF}
    decode_modes = [OFF]
    sweep_modes = [OFF]
    schema_modes = [OFF]
    if mtp_available:
        pp_modes["mtp_on"] = fixed(1)
        decode_modes += [fixed(k) for k in args.k] + [adaptive(max(args.k))]
        sweep_modes += [fixed(args.sweep_k), adaptive(max(args.k))]
        schema_modes += [fixed(max(args.k)), adaptive(max(args.k))]
    modes = {"pp": pp_modes, "decode": decode_modes, "concurrency": sweep_modes,
             "schema": schema_modes}
    runs = {"pp": len(args.prompt_lengths) * len(pp_modes),
            "decode": len(args.temperatures) * num_prompts * len(decode_modes),
            "concurrency": len(args.concurrency) * len(sweep_modes),
            "hf": 2 * (num_prompts + len(args.prompt_lengths)),
            "verify": 1,
            "quality": 1,
            "llamacpp": llama_cpp.plan_runs(args.prompt_lengths),
            "schema": num_schema_prompts * len(schema_bench.CONSTRAINTS) * len(schema_modes),
            "acceptance": len(args.temperatures) if mtp_available else 0}
    twins = 0
    if "concurrency" in args.sections:
        twins = len(sweep_modes) - 1  # each warmed up once
    repeated = [s for s in args.sections if s != "acceptance"]  # counts: the same every run
    measured = args.repeats * sum(runs[s] for s in repeated)
    if "acceptance" in args.sections:
        measured += runs["acceptance"]
    return modes, len(decode_modes) + twins + measured


def metadata(args, engine, prompts) -> dict:
    now = datetime.datetime.now(datetime.timezone.utc)
    return {
        "model": args.model,
        "mtp_head": head_label(engine.config.mtp_head),
        "dtype": str(engine.config.dtype).removeprefix("torch."),
        "quantization": engine.config.quantization,
        "device": str(engine.device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "mtpserve": __version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "date": now.isoformat(timespec="seconds"),
        "prompts": args.prompts or "built-in eval set",
        "num_prompts": len(prompts),
        "kinds": sorted({p.kind for p in prompts}),
        "repeats": args.repeats,
        "k": args.k,
        "temperatures": args.temperatures,
        "sweep_k": args.sweep_k,
        "sweep_tokens": args.sweep_tokens,
        "sweep_rounds": args.sweep_rounds,
        "ignore_eos": args.ignore_eos,
        "quick": args.quick,
        "sections": args.sections,
    }


def measure(args, engine, prompts, skipped: dict[str, dict]) -> dict:
    """Every section of ``args.sections`` on ``engine`` (options as resolved by cli/bench.py): the
    results; ``skipped``: those of the sections dropped (``skip_sections``)."""
    mtp = describe_mtp(engine, args)
    schema_prompts = []
    if "schema" in args.sections:
        schema_prompts = schema_bench.json_prompts(args.per_kind, args.max_tokens, args.prompts)
    modes, planned = plan(args, mtp["available"], len(prompts), len(schema_prompts))
    progress = tqdm(total=planned, desc="mtpserve bench", unit="run", file=sys.stderr,
                    dynamic_ncols=True)
    runs = engine_runs.EngineRuns(engine, progress)
    warm_up_ids = prompts[0].token_ids(engine.tokenizer)
    runs.warm_up(warm_up_ids, modes["decode"])
    device = str(engine.device)
    results = {"meta": metadata(args, engine, prompts), "mtp": mtp,
               "memory": {"kv_bytes_per_token": engine_runs.kv_bytes_per_token(engine),
                          "after_load": engine_runs.peak_memory(device)}}
    if "pp" in args.sections:
        results["prompt_processing"] = runs.prompt_processing(args.prompt_lengths, modes["pp"],
                                                              args.repeats)
    if "decode" in args.sections:
        seed = None if args.unseeded else args.seed
        results["decode"] = {}
        for t in args.temperatures:
            rows = runs.decode(prompts, modes["decode"], t, args.repeats, seed, args.ignore_eos)
            results["decode"][f"{t:g}"] = rows
    if "verify" in args.sections:
        results["verify"] = verify_cost.measure(engine, max(args.k), args.repeats, progress)
    # before the twins, the float reference and transformers' copy
    results["memory"].update(engine_runs.peak_memory(device))
    if "quality" in args.sections:
        results["quality"] = quality.measure(engine, prompts)
        progress.update(1)
    if "concurrency" in args.sections:
        sweep = [(modes["concurrency"][0], runs)]
        for mode in modes["concurrency"][1:]:
            twin = engine_runs.EngineRuns(engine_runs.twin(engine), progress)
            twin.warm_up(warm_up_ids, [mode])
            sweep.append((mode, twin))
        results["concurrency"] = engine_runs.concurrency(sweep, prompts, args.concurrency,
                                                         args.sweep_tokens, args.repeats,
                                                         args.sweep_rounds)
    if "hf" in args.sections:
        hf = load_hf(args.model, engine.config.dtype, device)
        results["hf"] = compare(runs, hf, prompts, args.prompt_lengths, args.repeats)
    if "llamacpp" in args.sections:
        results["llamacpp"] = llama_cpp_results(args, runs, prompts)
    if "schema" in args.sections:
        results["schema"] = schema_bench.measure(runs, schema_prompts, modes["schema"],
                                                 args.repeats)
    if "acceptance" in args.sections and mtp["available"]:
        seed = None if args.unseeded else args.seed
        results["acceptance"] = acceptance_bench.measure(runs, prompts, max(args.k),
                                                         args.temperatures, seed, args.ignore_eos)
    results.update(skipped)
    progress.close()
    return results


def llama_cpp_results(args, runs, prompts) -> dict:
    """The llama.cpp section, or why it failed (the other sections' results are kept)."""
    try:
        return llama_cpp.compare(runs, args.llama_bench, args.model, prompts, args.prompt_lengths,
                                 args.repeats)
    except llama_cpp.LlamaBenchError as e:
        return {"failed": str(e)}
