"""A tiny, deterministic, hub-free byte-level BPE tokenizer with a ChatML chat template.

verl needs a real Hugging Face tokenizer (chat template, eos/pad ids) at ``actor_rollout_ref.model.path``,
but nothing can be downloaded here, so we train one from generated text. Digits are split one per token
so a model with a few hundred thousand parameters can learn arithmetic digit by digit instead of having
to memorise multi-digit merges.

The normalizer / pre-tokenizer / decoder are exactly the ones ``transformers``' ``Qwen2Tokenizer`` builds:
for a directory whose ``config.json`` says ``model_type: qwen2``, ``AutoTokenizer`` (transformers 5) always
instantiates ``Qwen2Tokenizer``, which rebuilds that pipeline from the vocab and merges and ignores the one
in ``tokenizer.json``. Qwen2's split regex already isolates every digit, which is what a
``Digits(individual_digits=True)`` pre-tokenizer would do, so the tokenizer behaves identically whether it
is loaded from its own directory or from a model directory.

:func:`build_other_tokenizer` trains a teacher tokenizer of "another family" (``opd.teacher.view=own``):
Llama-3's split regex (digits in groups of up to three), other special tokens, a Llama-3-style chat template
with a default system prompt, another seed and vocabulary size. transformers rebuilds a qwen2 model
directory's tokenizer with Qwen2's regex, so models using it must be built with
``build_model(..., architecture="llama")`` (see :mod:`verl_opd.tiny.model`).
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from verl_opd.tiny.task import make_problem, prompt_text, solution_text

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END]
# What ``save_pretrained`` writes for this tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")

# Qwen-style ChatML; no default system message so prompts stay short for tiny models.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Llama-3's pre-tokenizer regex: Qwen2's, except that digits go in groups of up to three.
LLAMA3_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BEGIN_OF_TEXT = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
OTHER_SPECIAL_TOKENS = [BEGIN_OF_TEXT, END_OF_TEXT, START_HEADER, END_HEADER, EOT]
OTHER_DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
# Llama-3-style: a bos token, a system turn that is always there (the default one unless the conversation starts
# with a system message), and ``<|eot_id|>`` ending every turn.
OTHER_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system_message = messages[0]['content'] %}{% set loop_messages = messages[1:] %}"
    "{% else %}"
    "{% set system_message = '" + OTHER_DEFAULT_SYSTEM_PROMPT + "' %}{% set loop_messages = messages %}"
    "{% endif %}"
    "{{ '<|start_header_id|>system<|end_header_id|>\\n\\n' + system_message + '<|eot_id|>' }}"
    "{% for message in loop_messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# Generic English so that the vocabulary is not only arithmetic (verl's logs and prompts contain prose).
_ENGLISH = [
    "The quick brown fox jumps over the lazy dog.",
    "A student learns from a teacher by trying and being corrected.",
    "What is the answer to the question?",
    "Please think step by step and give the final answer.",
    "The model reads the prompt and writes a short reply.",
    "Numbers can be added, subtracted, multiplied and divided.",
    "You are a helpful assistant.",
    "This is a small example sentence for the tokenizer.",
    "On-policy distillation trains the student on its own samples.",
    "The sum of two numbers is another number.",
    "Reinforcement learning rewards good answers and penalises bad ones.",
    "Every morning she walks to the market and buys fresh bread.",
    "They compared the results of both experiments in a table.",
    "How many apples are left if he eats three of them?",
    "Training a language model needs data, compute and patience.",
    "The reward is one when the final answer is correct and zero otherwise.",
    "We sample several responses for each prompt and score them.",
    "Simple things should be simple, complex things should be possible.",
]


def _chatml_dialogue(user: str, assistant: str) -> str:
    return f"{IM_START}user\n{user}{IM_END}\n{IM_START}assistant\n{assistant}{IM_END}\n"


def _llama3_dialogue(user: str, assistant: str) -> str:
    return "".join(
        f"{START_HEADER}{role}{END_HEADER}\n\n{content}{EOT}"
        for role, content in (("system", OTHER_DEFAULT_SYSTEM_PROMPT), ("user", user), ("assistant", assistant))
    )


def _corpus(
    seed: int, dialogue: Callable[[str, str], str], n_arithmetic: int = 3000, n_english: int = 1000
) -> Iterator[str]:
    """Yield the deterministic training text: arithmetic dialogues in a chat format plus shuffled English."""
    rng = random.Random(seed)
    for i in range(n_arithmetic):
        question, answer = make_problem(rng, digits=1 + i % 3)
        yield dialogue(prompt_text(question), solution_text(question, answer))
    for _ in range(n_english):
        yield " ".join(rng.sample(_ENGLISH, k=3))


def _train_byte_level_bpe(
    split_regex: str, special_tokens: list[str], corpus: Iterator[str], vocab_size: int
) -> Tokenizer:
    """A byte-level BPE (every byte a token: any text, even invalid UTF-8, has an encoding) trained on ``corpus``."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split_regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


def build_tokenizer(
    out_dir: str | Path, vocab_size: int = 512, seed: int = 0, pad_is_eos: bool = False
) -> PreTrainedTokenizerFast:
    """Train the tiny tokenizer, save it to ``out_dir`` with ``save_pretrained`` and return it.

    The same arguments always give byte-identical files, so a teacher and a student built separately
    share exactly the same tokenizer (OPD compares their log-probs token by token).
    ``pad_is_eos=True`` makes the pad token the EOS token, as many released tokenizers do: the case
    where a mask built from token ids would drop the sampled EOS (spec rule 4).
    """
    tok = _train_byte_level_bpe(PRETOKENIZE_REGEX, SPECIAL_TOKENS, _corpus(seed, _chatml_dialogue), vocab_size)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=IM_END if pad_is_eos else PAD_TOKEN,
        unk_token=PAD_TOKEN,  # what Qwen2Tokenizer defaults to, so both load paths agree
        additional_special_tokens=[IM_START],
        model_max_length=512,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(str(out_dir))
    return hf_tok


def build_other_tokenizer(out_dir: str | Path, vocab_size: int = 400, seed: int = 1) -> PreTrainedTokenizerFast:
    """Train a teacher tokenizer of another family than :func:`build_tokenizer`'s, save it and return it.

    Like Llama-3: digits split in groups of up to three, ``<|begin_of_text|>`` prepended by ``encode`` (a
    post-processor) and by the chat template, ``<|eot_id|>`` ending every turn (and the eos token), and a
    default system prompt. Other merges too (another seed, vocabulary size and corpus format), so the same
    text tokenizes differently from the student's: what ``opd.teacher.view=own`` has to align.
    """
    tok = _train_byte_level_bpe(
        LLAMA3_PRETOKENIZE_REGEX, OTHER_SPECIAL_TOKENS, _corpus(seed, _llama3_dialogue), vocab_size
    )
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BEGIN_OF_TEXT} $A", special_tokens=[(BEGIN_OF_TEXT, tok.token_to_id(BEGIN_OF_TEXT))]
    )
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BEGIN_OF_TEXT,
        eos_token=EOT,
        pad_token=END_OF_TEXT,
        additional_special_tokens=[START_HEADER, END_HEADER],
        model_max_length=512,
    )
    hf_tok.chat_template = OTHER_CHAT_TEMPLATE
    hf_tok.save_pretrained(str(out_dir))
    return hf_tok


def copy_tokenizer(src_dir: str | Path, dst_dir: str | Path) -> None:
    """Copy the tokenizer files of ``src_dir`` into ``dst_dir`` byte for byte.

    A load/``save_pretrained`` round trip rewrites them (a qwen2 model dir loads as ``Qwen2Tokenizer``, which
    saves different BPE defaults and loader fields), so copying is the only way to keep every model built
    from one tokenizer byte-identical.
    """
    src, dst = Path(src_dir), Path(dst_dir)
    if not (src / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {src}")
    if dst.exists() and dst.samefile(src):
        return
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
