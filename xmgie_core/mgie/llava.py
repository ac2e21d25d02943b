"""MGIE's multimodal LLM: LLaVA-7B v1 (LLaMA + CLIP ViT-L/14 + one linear projector) writing the expressive
instruction and the 8 [IMG] hidden states that the edit head turns into the diffusion conditioning
(apple/ml-mgie, ICLR'24: mgie_llava.py and demo.ipynb).

Reproduced exactly:
- image features = CLIPVisionModel(pixels).hidden_states[-2][:, 1:] (penultimate layer, CLS dropped, 256 tokens
  at 224 px) through ONE nn.Linear(1024 -> 4096), the mm_projector;
- prompt: vicuna_v1_1 conversation (system + " " + "USER: " + text + " " + "ASSISTANT:") with
  text = "what will this image be like if '<instruction>'" + "\\n" + "<im_start>" + "<im_patch>" * 256 + "<im_end>";
  the <im_patch> embeddings are replaced by the projected image features (<im_start>/<im_end> stay);
- generation: greedy, max_new_tokens 96, no_repeat_ngram_size 3 over the whole sequence (prompt ids included,
  as in ml-mgie, whose generate saw input_ids); hid = the last layer's hidden states concatenated over the steps
  (prompt positions from step 0, then one per new token, so hid[i] is the state at sequence position i);
  [IMG] position p = min(seq.index(IMG0) - 1 if IMG0 in seq else len(hid) - 9, len(hid) - 9), states hid[p:p+8];
- expressive instruction = demo's remove_alter on the decoded output sequence.

Why not transformers' LlavaForConditionalGeneration: its LlavaMultiModalProjector is a 2-layer MLP (linear_1, GELU,
linear_2), not LLaVA v1's single Linear, and its prompt layout puts one <image> placeholder expanded to image
features with no <im_start>/<im_end> tokens around them, where v1 uses <im_start> <im_patch>*256 <im_end> with
learned start/end embeddings. So we compose LlamaForCausalLM + CLIPVisionModel + our own projector and feed the
spliced embeddings to llm.generate(inputs_embeds=...).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import XMGIEInputError
from ..image_io import to_rgb8
from .edit_head import NUM_IMG_TOKENS, EditMapper, mgie_conditioning
from .meta import ADDED_TOKENS, CONVERT_HINT, IM_END, IM_PATCH, IM_START, MGIEMeta, check_tokens

LOG = logging.getLogger("xmgie")

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions.")
"""vicuna_v1_1's system message (LLaVA's conversation.py)."""
INSTRUCTION_TEMPLATE = "what will this image be like if '{instruction}'"
"""ml-mgie's demo wording of the user's instruction."""
PROMPT_TEMPLATE = VICUNA_SYSTEM + " USER: {text} ASSISTANT:"
"""vicuna_v1_1 (sep_style TWO, sep " ", sep2 "</s>") with one user message and an open assistant turn."""
MAX_NEW_TOKENS = 96
NO_REPEAT_NGRAM_SIZE = 3


def mgie_prompt(instruction: str, image_token_len: int) -> str:
    """The full prompt string ml-mgie's demo tokenizes (before the <im_patch> embeddings are replaced)."""
    text = (INSTRUCTION_TEMPLATE.format(instruction=instruction) + "\n" + IM_START + IM_PATCH * image_token_len
            + IM_END)
    return PROMPT_TEMPLATE.format(text=text)


def img_position(sequence: list[int], hidden_len: int, img0_id: int) -> int:
    """Start of the 8 [IMG] states in hid: min(seq.index(IMG0) - 1 if IMG0 in seq else len(hid) - 9, len(hid) - 9).

    `sequence` is the full output sequence (prompt + new tokens); hid[i] is the state at position i, so the states
    at p..p+7 are the ones that predict [IMG0]..[IMG7]. Without [IMG0] the last 8 states before the final one.
    """
    fallback = hidden_len - (NUM_IMG_TOKENS + 1)
    return min(sequence.index(img0_id) - 1 if img0_id in sequence else fallback, fallback)


def clean_expressive(text: str) -> str:
    """ml-mgie demo's remove_alter: after 'ASSISTANT:', before '</s>', before 'alternative' (any case), before
    '[IMG0]'; the first two '.'-separated sentences joined with '.'; ends with '.'. Empty text gives ''."""
    s = text
    if "ASSISTANT:" in s:
        s = s[s.index("ASSISTANT:") + len("ASSISTANT:"):].strip()
    if "</s>" in s:
        s = s[:s.index("</s>")].strip()
    if "alternative" in s.lower():
        s = s[:s.lower().index("alternative")]
    if "[IMG0]" in s:
        s = s[:s.index("[IMG0]")]
    s = ".".join(part.strip() for part in s.split(".")[:2])
    if not s:
        return ""
    if s[-1] != ".":
        s += "."
    return s.strip()


@dataclass
class MGIEResult:
    expressive_instruction: str
    img_hidden: torch.Tensor
    """[1, 8, D]: the LLM's last-layer states at the [IMG] positions."""
    positive: torch.Tensor
    """[1, 77, 768]: edit_head(img_hidden, emb)."""
    negative: torch.Tensor
    """[1, 77, 768]: edit_head(zeros, emb)."""
    new_tokens: list[int]
    img_generated: bool = True
    """False when [IMG0] was never generated and the fallback position (len(hid) - 9) was used."""


def _shape(t: torch.Tensor) -> str:
    return "x".join(str(s) for s in t.shape)


def check_parts(llm: Any, tokenizer: Any, vision: Any, projector: nn.Linear, edit_head: EditMapper,
                meta: MGIEMeta) -> None:
    """The pieces of an MGIE model must fit together; say which do not."""
    check_tokens(tokenizer, meta)
    problems = []
    hidden = llm.config.hidden_size
    vocab = llm.get_input_embeddings().weight.shape[0]
    top = max(meta.im_patch_id, meta.im_start_id, meta.im_end_id, *meta.img_token_ids)
    if top >= vocab:
        problems.append(f"the LLM has {vocab} token embeddings but the added tokens go up to id {top}")
    if projector.out_features != hidden:
        problems.append(f"the projector outputs {projector.out_features} features but the LLM's hidden size is {hidden}")
    if projector.in_features != vision.config.hidden_size:
        problems.append(f"the projector takes {projector.in_features} features but the vision tower gives "
                        f"{vision.config.hidden_size}")
    if edit_head.llm_dim != hidden:
        problems.append(f"the edit head takes {edit_head.llm_dim} features but the LLM's hidden size is {hidden}")
    if edit_head.config != meta.edit_head_args():
        problems.append(f"the edit head is {edit_head.config} but the metadata says {meta.edit_head_args()}")
    patches = (vision.config.image_size // vision.config.patch_size) ** 2
    if patches != meta.image_token_len:
        problems.append(f"the vision tower gives {patches} patch tokens but image_token_len is {meta.image_token_len}")
    layers = vision.config.num_hidden_layers
    if not -(layers + 1) <= meta.vision_select_layer <= layers:
        problems.append(f"vision_select_layer {meta.vision_select_layer} is outside the tower's {layers + 1} "
                        "hidden states")
    if problems:
        raise XMGIEInputError(f"The MGIE model's parts do not fit together: {'; '.join(problems)}. Re-create the "
                              f"folder: {CONVERT_HINT}.")


class MGIE:
    """LLaVA v1 (LLaMA + CLIP vision + linear projector) with MGIE's edit head."""

    def __init__(self, llm: Any, tokenizer: Any, vision: Any, image_processor: Any, projector: nn.Linear,
                 edit_head: EditMapper, meta: MGIEMeta):
        check_parts(llm, tokenizer, vision, projector, edit_head, meta)
        self.llm, self.tokenizer, self.vision, self.image_processor = llm, tokenizer, vision, image_processor
        self.projector, self.edit_head, self.meta = projector, edit_head, meta

    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.get_input_embeddings().weight.dtype

    # ---- inputs -------------------------------------------------------------------------------------------------

    def prompt_ids(self, instruction: str) -> torch.Tensor:
        """Token ids [1, L] of mgie_prompt(instruction) (with the tokenizer's BOS, as the demo's tokenizer(txt))."""
        text = instruction.strip() if isinstance(instruction, str) else ""
        if not text:
            raise XMGIEInputError("The MGIE instruction is empty; write the edit to make, e.g. 'make the sky blue'.")
        found = [t for t in ADDED_TOKENS if t in text]
        if found:
            raise XMGIEInputError(f"The instruction contains MGIE's reserved tokens {found}; remove them from the "
                                  "instruction text.")
        ids = self.tokenizer(mgie_prompt(text, self.meta.image_token_len), return_tensors="pt").input_ids
        row = ids[0].tolist()
        n = self.meta.image_token_len
        patches = [i for i, t in enumerate(row) if t == self.meta.im_patch_id]
        start = patches[0] if patches else -1
        if (len(patches) != n or patches != list(range(start, start + n)) or start < 1
                or row[start - 1] != self.meta.im_start_id or start + n >= len(row)
                or row[start + n] != self.meta.im_end_id):
            raise XMGIEInputError(f"The MGIE tokenizer did not keep <im_start><im_patch>*{n}<im_end> together in the "
                                  f"prompt (found {len(patches)} <im_patch> tokens). Re-create the folder: "
                                  f"{CONVERT_HINT}.")
        return ids

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """ComfyUI IMAGE [H,W,C] or [1,H,W,C] float 0..1 -> CLIP pixel values [1, 3, S, S] (the CLIPImageProcessor
        on the 8-bit RGB image, as the demo's image_processor.preprocess(PIL image))."""
        from PIL import Image

        if not isinstance(image, torch.Tensor):
            raise XMGIEInputError(f"MGIE takes a ComfyUI IMAGE tensor, got {type(image).__name__}.")
        if image.ndim == 3:
            image = image.unsqueeze(0)
        if image.ndim != 4 or image.shape[0] != 1 or image.shape[-1] not in (1, 2, 3, 4):
            raise XMGIEInputError(f"MGIE takes one image of shape [height, width, 3] or [1, height, width, 3], got "
                                  f"{_shape(image)}; split a batch with an image-batch node and run one at a time.")
        if not image.is_floating_point() or min(image.shape) == 0 or not bool(torch.isfinite(image).all()):
            raise XMGIEInputError(f"The MGIE image must be a non-empty float IMAGE in 0..1 without NaN, got dtype "
                                  f"{image.dtype} shape {_shape(image)}.")
        pil = Image.fromarray(to_rgb8(image)[0])
        return self.image_processor(images=pil, return_tensors="pt")["pixel_values"]

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """CLIP pixel values [B, 3, S, S] -> projected features [B, image_token_len, D]: the selected hidden state
        (penultimate by default) with CLS dropped, through mm_projector."""
        vision_dtype = next(self.vision.parameters()).dtype
        out = self.vision(pixels.to(device=self.device, dtype=vision_dtype), output_hidden_states=True)
        feats = out.hidden_states[self.meta.vision_select_layer][:, 1:]
        return self.projector(feats.to(self.projector.weight.dtype))

    def img_embeddings(self) -> torch.Tensor:
        """The input embeddings of [IMG0]..[IMG7], [8, D] (ml-mgie: embed_tokens.weight[-8:])."""
        ids = torch.tensor(self.meta.img_token_ids, device=self.device)
        return self.llm.get_input_embeddings().weight[ids]

    def _inputs(self, instruction: str, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids = self.prompt_ids(instruction).to(self.device)
        feats = self.image_features(self.preprocess(image))
        embeds = self.llm.get_input_embeddings()(ids)
        positions = (ids[0] == self.meta.im_patch_id).nonzero()[:, 0]
        embeds = embeds.clone()
        embeds[0, positions] = feats[0].to(embeds.dtype)
        return ids, embeds, torch.ones_like(ids)

    @torch.no_grad()
    def input_embeddings(self, instruction: str, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs_embeds [1, L, D], attention_mask [1, L]): the prompt's token embeddings with the <im_patch>
        ones replaced by the projected image features."""
        _, embeds, mask = self._inputs(instruction, image)
        return embeds, mask

    # ---- generation ---------------------------------------------------------------------------------------------

    def conditioning(self, img_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(positive, negative) [B, queries, out_dim] from [IMG] states [B, 8, D]."""
        return mgie_conditioning(self.edit_head, img_hidden, self.img_embeddings())

    @torch.no_grad()
    def generate(self, image: torch.Tensor, instruction: str, max_new_tokens: int = MAX_NEW_TOKENS,
                 seed: int = 0) -> MGIEResult:
        """Greedy generation (ml-mgie's demo settings) -> expressive instruction, [IMG] states, conditioning.

        `seed` seeds torch's generator around the call; greedy decoding does not use it.
        """
        from transformers import GenerationConfig

        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise XMGIEInputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
        ids, embeds, mask = self._inputs(instruction, image)
        tok = self.tokenizer
        config = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, no_repeat_ngram_size=NO_REPEAT_NGRAM_SIZE,
            return_dict_in_generate=True, output_hidden_states=True, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id if tok.pad_token_id is not None
            else tok.eos_token_id,
        )
        device = torch.device(self.device)
        devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            # input_ids rides along with inputs_embeds so that no_repeat_ngram_size sees the prompt's n-grams, as
            # it did in ml-mgie (whose generate took input_ids and spliced the image inside the model).
            out = self.llm.generate(input_ids=ids, inputs_embeds=embeds, attention_mask=mask,
                                    generation_config=config)
        sequence, new_tokens = self._full_sequence(ids[0].tolist(), out.sequences[0].tolist())
        hid = torch.cat([step[-1] for step in out.hidden_states], dim=1)[0]
        if hid.shape[0] != len(sequence) - 1:
            raise RuntimeError(f"MGIE: {hid.shape[0]} hidden states for a sequence of {len(sequence)} tokens; "
                               "expected one per position but the last.")
        img0 = self.meta.img_token_ids[0]
        p = img_position(sequence, hid.shape[0], img0)
        img_generated = img0 in new_tokens
        if not img_generated:
            LOG.warning("xMGIE: the MGIE model did not generate [IMG0]; using the states before the last token "
                        "(ml-mgie's fallback).")
        img_hidden = hid[p:p + NUM_IMG_TOKENS].unsqueeze(0)
        positive, negative = self.conditioning(img_hidden)
        text = clean_expressive(tok.decode(sequence, skip_special_tokens=False))
        return MGIEResult(expressive_instruction=text, img_hidden=img_hidden, positive=positive, negative=negative,
                          new_tokens=new_tokens, img_generated=img_generated)

    @staticmethod
    def _full_sequence(prompt: list[int], sequence: list[int]) -> tuple[list[int], list[int]]:
        """(prompt + new tokens, new tokens) whether generate returned the prompt ids or only the new tokens."""
        if len(sequence) >= len(prompt) and sequence[:len(prompt)] == prompt:
            return sequence, sequence[len(prompt):]
        return prompt + sequence, sequence
