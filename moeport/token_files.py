"""The token files `moeport forward` and `moeport generate` read and write: .npy token ids, .jsonl prompts,
generated sequences (.jsonl lists, or a padded .npy with its lengths beside it), and the stop-id option."""

from __future__ import annotations

import json

from moeport.base.errors import UserError


def read_tokens(path: str, vocab_size: int):
    """The int64 token ids [B, T] of a .npy file, or a UserError naming the file and what is wrong."""
    import numpy as np

    from moeport.jobs import check_tokens

    try:
        tokens = np.load(path)
    except FileNotFoundError:
        raise UserError(f"--tokens {path}: no such file") from None
    except (ValueError, OSError) as exc:
        raise UserError(f"--tokens {path}: not a .npy array ({exc})") from None
    return check_tokens(tokens, vocab_size, path).numpy()


def save_npy(path: str, array) -> None:
    """Write `array` as a .npy file at `path`, atomically; a WriteError naming the cause if that fails."""
    from types import SimpleNamespace

    import numpy as np

    from moeport.base.atomic import atomic_path

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        # through write() alone: numpy's C tofile() on a real file reports a failed write as
        # "24576 requested and 11232 written", without the errno that names the cause
        np.save(SimpleNamespace(write=f.write), array)


def read_prompts(path: str, vocab_size: int) -> list[list[int]]:
    """The prompts of a .jsonl file, one JSON list of token ids per line (blank lines skipped), or a UserError
    naming the file, the line and what was expected."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise UserError(f"--tokens {path}: no such file") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"--tokens {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise UserError(f"--tokens {path}: cannot read it ({exc.strerror or exc})") from None
    prompts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            prompt = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{where}: not JSON ({exc.msg}); expected a list of token ids such as [1, 2, 3]") from None
        if not isinstance(prompt, list):
            got = f"{type(prompt).__name__} {line.strip()[:40]}"
            raise UserError(f"{where}: expected a JSON list of token ids, got {got}")
        if not prompt:
            raise UserError(f"{where}: empty prompt; each prompt needs at least one token id")
        for token in prompt:
            if type(token) is not int:
                raise UserError(f"{where}: token ids must be integers, got {json.dumps(token)[:40]}")
            if not 0 <= token < vocab_size:
                raise UserError(f"{where}: token id {token} is outside the vocabulary [0, {vocab_size})")
        prompts.append(prompt)
    if not prompts:
        raise UserError(f"--tokens {path}: no prompts; expected one JSON list of token ids per line")
    return prompts


def stop_ids_option(values: list[str] | None, vocab_size: int) -> list[int] | None:
    """--eos-id's stop ids: None (not given: the checkpoint's), [] for `none` (never stop), else the ids."""
    if not values:
        return None
    if any(v.strip().lower() == "none" for v in values):
        if len(values) > 1:
            raise UserError(f"--eos-id none: never stop, so it takes no other --eos-id (got {', '.join(values)})")
        return []
    ids = []
    for value in values:
        try:
            token = int(value)
        except ValueError:
            raise UserError(f"--eos-id {value}: expected a token id (an integer; repeat --eos-id for more) "
                            f"or none") from None
        if not 0 <= token < vocab_size:
            raise UserError(f"--eos-id {token}: outside the vocabulary [0, {vocab_size})")
        ids.append(token)
    return ids


def lengths_path(out: str) -> str:
    """Where `--out X.npy` puts the sequences' lengths: X.lengths.npy."""
    return out.removesuffix(".npy") + ".lengths.npy"


def emit_sequences(out: str | None, sequences: list[list[int]], pad: int, as_lists: bool) -> None:
    """Write the generated sequences (each its prompt and its generated ids) to `out`: a .jsonl of one JSON list a
    line, or else a .npy [B, W] (each row the sequence from column 0, then `pad` to the longest's length W) and
    beside it OUT.lengths.npy [B] (each sequence's length); print them without `out` (JSON lists `as_lists`, else
    the padded rows as space-separated ids)."""
    import numpy as np

    from moeport.base.atomic import write_text

    lengths = np.array([len(s) for s in sequences], dtype=np.int64)
    padded = np.full((len(sequences), int(lengths.max())), pad, dtype=np.int64)
    for row, sequence in enumerate(sequences):
        padded[row, : len(sequence)] = sequence
    if out and out.endswith(".jsonl"):
        write_text(out, "".join(json.dumps(s) + "\n" for s in sequences))
        print(f"wrote {len(sequences)} sequences (prompt and generated token ids, one JSON list a line) to {out}")
    elif out:
        save_npy(out, padded)
        save_npy(lengths_path(out), lengths)
        print(f"wrote token ids {list(padded.shape)} (padded with {pad}) to {out} "
              f"and their lengths [{len(lengths)}] to {lengths_path(out)}")
    elif as_lists:
        for sequence in sequences:
            print(json.dumps(sequence))
    else:
        for row in padded:
            print(" ".join(str(int(t)) for t in row))
