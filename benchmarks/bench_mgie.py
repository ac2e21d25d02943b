"""MGIE speed and memory, in this process (random weights, CPU).

- Edit head at ml-mgie's size (4096 -> 512, 4 + 4 transformer layers, 77 queries -> 768): one call for a batch of 1,
  against one Linear 4096 -> 768 over the 8 states (a floor: what a head without the transformer would cost).
- Generation: a LLaMA with 7B's layer shapes (width 4096, 32 heads, MLP 11008, vocabulary 32011) truncated to 2
  layers, CLIP ViT-L/14 and the projector, the real prompt (256 image tokens); MGIE.generate (hidden states kept,
  [IMG] position, edit head) per new token, against plain greedy decoding of the same model and prompt; fp32 and
  bf16. Peak memory is read in a child process (benchmarks/_measure.py).

Run: python benchmarks/bench_mgie.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from _measure import in_memory_phase, memory_phase, peak_mb, time_calls  # noqa: E402
from xmgie_core.mgie.edit_head import EditMapper  # noqa: E402
from xmgie_core.mgie.llava import MGIE  # noqa: E402
from xmgie_core.mgie.meta import ADDED_TOKENS, MGIEMeta  # noqa: E402

SHORT, LONG = 4, 20
"""New tokens of the two timed generations: per token = (t(LONG) - t(SHORT)) / (LONG - SHORT)."""


def tokenizer():
    """A 32000-token word-level stand-in for LLaMA's tokenizer, plus MGIE's 11 added tokens (32000-32010)."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(("<unk>", "<s>", "</s>", *string.printable))}
    vocab.update({f"<filler{i}>": i for i in range(len(vocab), 32000)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.add_tokens(list(ADDED_TOKENS), special_tokens=True)
    return fast


def mgie(dtype: torch.dtype) -> MGIE:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = tokenizer()
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=4096, intermediate_size=11008,
                                       num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=32,
                                       max_position_embeddings=2048, eos_token_id=2, bos_token_id=1))
    vision = CLIPVisionModel(CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                              num_attention_heads=16, image_size=224, patch_size=14))
    parts = [m.to(dtype).eval().requires_grad_(False) for m in
             (llm, vision, torch.nn.Linear(1024, 4096), EditMapper())]
    processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    return MGIE(parts[0], tok, parts[1], processor, parts[2], parts[3], MGIEMeta.from_tokenizer(tok))


def plain_greedy(model: MGIE, image: torch.Tensor, new: int) -> None:
    """The same model and prompt decoded greedily, without hidden states or the edit head (the baseline)."""
    embeds, mask = model.input_embeddings("give the man a red scarf", image)
    model.llm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, num_beams=1)


def generation(dtype: torch.dtype, rounds: int) -> dict:
    model = mgie(dtype)
    model.tokenizer.eos_token_id = None  # random weights: never stop early, so every call makes its tokens
    image = torch.rand(1, 256, 256, 3)
    calls = {f"{kind} {n}": (lambda k=kind, n=n: (model.generate(image, "give the man a red scarf", n) if k == "mgie"
                                                   else plain_greedy(model, image, n)))
             for kind in ("plain", "mgie") for n in (SHORT, LONG)}
    with torch.inference_mode():
        if in_memory_phase():
            return {"peak": peak_mb(calls[f"mgie {LONG}"], repeats=1)}
        times = time_calls(calls, rounds)
    per = {k: (times[f"{k} {LONG}"] - times[f"{k} {SHORT}"]) / (LONG - SHORT) for k in ("plain", "mgie")}
    return {"per_token": per["mgie"], "ratio": per["mgie"] / per["plain"], "first": times[f"mgie {SHORT}"]}


def edit_head(rounds: int) -> dict:
    torch.manual_seed(0)
    head, floor = EditMapper().eval(), torch.nn.Linear(4096, 768)
    states, embeds = torch.randn(1, 8, 4096), torch.randn(8, 4096)
    with torch.inference_mode():
        calls = {"floor": lambda: floor(states + embeds), "head": lambda: head(states, embeds)}
        if in_memory_phase():
            return {"peak": peak_mb(calls["head"])}
        times = time_calls(calls, rounds)
    return {"seconds": times["head"], "ratio": times["head"] / times["floor"]}


def main() -> None:
    logging.getLogger("xmgie").setLevel(logging.ERROR)  # random weights never write [IMG0]: the fallback warning
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args([a for a in sys.argv[1:] if a != "--memory-phase"])
    parts = {"edit head": lambda r: edit_head(r), "fp32": lambda r: generation(torch.float32, r),
             "bf16": lambda r: generation(torch.bfloat16, r)}
    if in_memory_phase():
        memory_phase({name: fn(1) for name, fn in parts.items()})
        return
    memory = memory_phase()
    head = parts["edit head"](args.rounds)
    print(f"edit head, batch 1: {head['seconds'] * 1e3:.1f} ms ({head['ratio']:.1f}x a Linear 4096->768 over the 8 "
          f"states), peak +{memory['edit head']['peak']:.0f} MB")
    for name in ("fp32", "bf16"):
        g = parts[name](args.rounds)
        print(f"{name}: 2-layer 7B-shaped LLaMA + CLIP-L: {g['per_token'] * 1e3:.0f} ms per new token "
              f"({g['ratio']:.2f}x plain greedy decoding), {SHORT} tokens incl. prompt + image in "
              f"{g['first']:.1f} s, peak +{memory[name]['peak']:.0f} MB")


if __name__ == "__main__":
    main()
