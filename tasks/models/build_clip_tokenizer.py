"""Build the real CLIP BPE tokenizer (49,408 tokens) offline into `tasks/assets/clip_tokenizer/`.

The vocabulary is OpenAI CLIP's byte-level BPE (`bpe_simple_vocab_16e6.txt.gz`, MIT licence,
https://github.com/openai/CLIP), taken from the `open_clip_torch` wheel (also MIT), which is the
one copy a package registry serves. `pip download --no-deps` fetches only that wheel; nothing is
installed (open_clip_torch must never be installed here: it pulls a CUDA torch).
The output is committed, so run time never needs the network. Rebuild with:

    python -m tasks.models.build_clip_tokenizer [OUT_FOLDER]
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from transformers import CLIPTokenizer

from tasks.assets import CLIP_TOKENIZER_DIR

ASSET_DIR = CLIP_TOKENIZER_DIR
BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
N_MERGES = 49152 - 256 - 2  # CLIP keeps lines[1 : 49152 - 256 - 2 + 1] of the BPE file
START, END = "<|startoftext|>", "<|endoftext|>"
CHECK_TEXT = "a photo of a cat"
CHECK_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]

TOKENIZER_CONFIG = {
    "tokenizer_class": "CLIPTokenizer",
    "model_max_length": 77,
    "do_lower_case": True,
    "errors": "replace",
    "add_prefix_space": False,
    "bos_token": START,
    "eos_token": END,
    "unk_token": END,
    "pad_token": END,  # as in Stable Diffusion 1.5's tokenizer
}
SPECIAL_TOKENS_MAP = {"bos_token": START, "eos_token": END, "unk_token": END, "pad_token": END}


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable character table; the order fixes token ids 0-255."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def download_bpe_lines(work_dir: Path) -> list[str]:
    """Fetch the open_clip_torch wheel with pip (no deps, no install) and read the BPE file from it."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "open_clip_torch", "-d", str(work_dir)],
        check=True,
    )
    wheels = sorted(work_dir.glob("open_clip_torch-*.whl"))
    if not wheels:
        raise FileNotFoundError(f"pip download left no open_clip_torch wheel in {work_dir}")
    with zipfile.ZipFile(wheels[-1]) as wheel:
        text = gzip.decompress(wheel.read(BPE_MEMBER)).decode("utf-8")
    return text.split("\n")


def vocab_and_merges(bpe_lines: list[str]) -> tuple[dict[str, int], list[str]]:
    """Build token -> id and the merge list exactly as OpenAI CLIP's SimpleTokenizer does."""
    merges = bpe_lines[1 : N_MERGES + 1]
    tokens = list(bytes_to_unicode().values())
    tokens += [t + "</w>" for t in tokens]
    tokens += ["".join(m.split()) for m in merges]
    tokens += [START, END]
    if len(tokens) != VOCAB_SIZE or len(set(tokens)) != VOCAB_SIZE:
        raise ValueError(f"built {len(tokens)} tokens ({len(set(tokens))} unique), expected {VOCAB_SIZE}")
    return {t: i for i, t in enumerate(tokens)}, merges


def write_tokenizer_files(vocab: dict[str, int], merges: list[str], out_dir: Path) -> None:
    """Write the four files `CLIPTokenizer.from_pretrained` reads."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    for name, content in (("tokenizer_config.json", TOKENIZER_CONFIG), ("special_tokens_map.json", SPECIAL_TOKENS_MAP)):
        (out_dir / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")


def check_tokenizer(folder: Path) -> None:
    """Fail loudly unless the folder tokenizes the reference sentence to CLIP's known ids."""
    ids = CLIPTokenizer.from_pretrained(str(folder))(CHECK_TEXT).input_ids
    if ids != CHECK_IDS:
        raise ValueError(f"{folder}: {CHECK_TEXT!r} -> {ids}, expected {CHECK_IDS}")


def build_clip_tokenizer(out_dir: Path = ASSET_DIR) -> Path:
    """Download, convert, write and check the CLIP tokenizer; return the folder."""
    with tempfile.TemporaryDirectory() as tmp:
        vocab, merges = vocab_and_merges(download_bpe_lines(Path(tmp)))
    write_tokenizer_files(vocab, merges, out_dir)
    check_tokenizer(out_dir)
    return out_dir


if __name__ == "__main__":
    folder = build_clip_tokenizer(Path(sys.argv[1]) if len(sys.argv) > 1 else ASSET_DIR)
    print(f"CLIP tokenizer ({VOCAB_SIZE} tokens) written to {folder}")
