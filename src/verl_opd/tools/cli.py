"""The ``verl-opd`` command line.

Each top-level subcommand is registered by one ``add_*_parser(subparsers)`` function listed in
``PARSER_BUILDERS``; every leaf parser sets ``func`` (called with the parsed namespace, returning an exit
code). Heavy imports (torch, transformers) happen inside the handlers so ``verl-opd --help`` stays instant.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from verl_opd.tools.demo import STUDENT_STORY, add_demo_parser
from verl_opd.tools.doctor import add_doctor_parser


def _tiny_tokenizer(args: argparse.Namespace) -> int:
    from verl_opd.tiny.tokenizer import build_tokenizer

    tok = build_tokenizer(args.out, vocab_size=args.vocab_size, seed=args.seed)
    print(f"tokenizer: {args.out} (vocab {len(tok)}, eos {tok.eos_token!r}, pad {tok.pad_token!r})")
    return 0


def _tiny_model(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM

    from verl_opd.tiny.model import build_model, count_parameters

    path = build_model(
        args.out,
        args.tokenizer,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        num_kv_heads=args.num_kv_heads,
        intermediate_size=args.intermediate_size,
        seed=args.seed,
        max_position_embeddings=args.max_position_embeddings,
    )
    n_params = count_parameters(AutoModelForCausalLM.from_pretrained(path))
    print(f"model: {path} ({n_params:,} parameters, tokenizer saved alongside)")
    return 0


def _tiny_data(args: argparse.Namespace) -> int:
    from verl_opd.tiny.task import build_dataset

    train, test = build_dataset(args.out, n_train=args.n_train, n_test=args.n_test, seed=args.seed, digits=args.digits)
    print(f"train: {train} ({args.n_train} rows)\ntest: {test} ({args.n_test} rows)")
    return 0


def _tiny_demo_models(args: argparse.Namespace) -> int:
    from verl_opd.tiny.demo_models import build_demo_models

    result = build_demo_models(args.out, seed=args.seed, student=args.student)
    state = "reused cache" if result["cached"] else f"built in {sum(result['seconds'].values()):.0f}s"
    print(f"demo models in {args.out} ({state})")
    for role in ("teacher", "student"):
        print(f"{role}: {result[role]} (greedy accuracy {result[f'{role}_accuracy']:.1%})")
    print(f"train: {result['train']}\ntest: {result['test']}")
    return 0


def add_tiny_parser(subparsers: argparse._SubParsersAction) -> None:
    """``verl-opd tiny {tokenizer,model,data,demo-models}``: build hub-free tiny artifacts locally."""
    tiny = subparsers.add_parser("tiny", help="build a tiny tokenizer, model or dataset locally (no hub)")
    leaves = tiny.add_subparsers(dest="tiny_command", required=True)

    p = leaves.add_parser("tokenizer", help="train the tiny byte-level BPE tokenizer")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_tiny_tokenizer)

    p = leaves.add_parser("model", help="build a seeded random Qwen2 model (saved with its tokenizer)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--tokenizer", required=True, help="directory of a tokenizer built by `tiny tokenizer`")
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--num-kv-heads", type=int, default=2)
    p.add_argument("--intermediate-size", type=int, default=None, help="default: 2 * hidden size")
    p.add_argument("--max-position-embeddings", type=int, default=8192)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_tiny_model)

    p = leaves.add_parser("data", help="write the addition task as gsm8k-schema train/test parquet")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--n-train", type=int, default=512)
    p.add_argument("--n-test", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--digits", type=int, default=2, help="digits per operand")
    p.set_defaults(func=_tiny_data)

    p = leaves.add_parser("demo-models", help="build (or reuse) the demo's SFT teacher and weaker student")
    p.add_argument("--out", required=True, help="output directory (also the cache)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--student", choices=tuple(STUDENT_STORY), default="habit", help="which student kind to build")
    p.set_defaults(func=_tiny_demo_models)


PARSER_BUILDERS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_tiny_parser,
    add_doctor_parser,
    add_demo_parser,
]


def build_parser() -> argparse.ArgumentParser:
    """The full parser: one top-level subcommand per entry of ``PARSER_BUILDERS``."""
    parser = argparse.ArgumentParser(prog="verl-opd", description="On-policy distillation for verl.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add_parser in PARSER_BUILDERS:
        add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and run the chosen subcommand; returns its exit code."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
