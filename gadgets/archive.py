"""``cdl-lambda replay`` over many recorded files: several paths and/or folders (their ``*.h5``, subfolders
included), one process, the model loaded once.

Every file goes through the same in-process :class:`gadgets.server.Server` (its reconstructor cache keeps torch and
the weights loaded from the first file to the last), or to ``--server HOST:PORT`` (a running ``cdl-lambda serve``
or Gadgetron, e.g. the main node of ``chains/cdl_lambda_distributed.xml``). Outputs go into the ``--out`` folder,
named after the inputs (``scan.h5`` → ``OUT/scan.h5``; a folder's files keep their paths below it), each written as
a single replay writes it (replaced only when images came back). One summary line per file on stdout; a file that
fails (unreadable, no images, errors reported) is named and the others go on; the exit status is 1 when any file
failed, with a last line naming them, 2 for a bad argument (nothing reconstructed).

More machines: run one such process per machine on its share of the files with the site's batch scheduler
(``cdl-lambda replay --out OUT FILES…``), or send the files to the distributed chain's main node with ``--server``.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from cdl_lambda.gadgets import replay as single
from cdl_lambda.gadgets.settings import parse_param_items

log = logging.getLogger(__name__)
SUFFIXES = (".h5",)


def collect(inputs: list[str]) -> list[tuple[Path, Path]]:
    """``(input file, output path relative to --out)`` for every file given and every ``*.h5`` below every folder
    given, in order; UsageError for a path that does not exist, a folder without scans, or two inputs that would
    write the same output."""
    pairs: list[tuple[Path, Path]] = []
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
            if not found:
                raise single.UsageError(f"folder {path} holds no {'/'.join(SUFFIXES)} files")
            pairs += [(p, p.relative_to(path)) for p in found]
        elif path.is_file():
            pairs.append((path, Path(path.name)))
        else:
            raise single.UsageError(f"input {path} does not exist")
    seen: dict[Path, Path] = {}
    for source, relative in pairs:
        if relative in seen:
            raise single.UsageError(f"{seen[relative]} and {source} would both be written to {relative}")
        seen[relative] = source
    return pairs


def check_folder(out: Path) -> None:
    """UsageError unless ``out`` is (or can be made) a writable folder."""
    if out.suffix.lower() in SUFFIXES or (out.exists() and not out.is_dir()):
        raise single.UsageError(f"--out {out}: with several inputs --out names a folder for the outputs")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise single.UsageError(f"--out {out}: cannot create the folder: {error.strerror or error}") from None
    single.check_output(out / "probe.h5")  # writable?


def parameters_of(args) -> dict:
    return parse_param_items(args.param, args.device)


def reconstruct_one(source: Path, target: Path, args, parameters: dict, local_server) -> tuple[bool, str]:
    """Replay ``source`` and write ``target`` (and its previews); (ok, summary)."""
    start = time.perf_counter()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        result = single.replay(source, server=args.server, config=args.chain, parameters=parameters or None,
                               progress=False, dataset=args.dataset, local_server=local_server)
    except (ValueError, OSError) as error:
        return False, f"{error}"
    if not result.images:
        errors = "; ".join(str(e) for e in result.errors[:3])
        return False, "no images came back" + (f": {errors}" if errors else "")
    previews = None if args.no_previews else target.with_name(target.stem + "_previews")
    try:
        counts = single.save(result.images, target, args.out_group, previews)
    except single.OutputError as error:
        return False, str(error)
    summary = (f"{len(result.images)} image(s) {dict(sorted(counts.items()))} in {time.perf_counter() - start:.1f} s"
               f" → {target}")
    if result.errors:
        return False, f"{summary}, but the reconstruction reported: " + "; ".join(str(e) for e in result.errors[:3])
    return True, summary


def main(args, inputs: list[str]) -> int:
    """Exit status 0: every file reconstructed; 1: some failed (named on the last line); 2: a bad argument."""
    try:
        pairs = collect(inputs)
        parameters = parameters_of(args)
        single.check_request(args, parameters)
        out = Path(args.out)
        check_folder(out)
    except single.UsageError as error:
        log.error("%s", error)
        return 2
    local_server = None
    if not args.server:
        from cdl_lambda.gadgets.server import Server
        local_server = Server(listen=False)  # one reconstructor cache, the model loaded once; no port opened
    failed = []
    try:
        for number, (source, relative) in enumerate(pairs, 1):
            ok, summary = reconstruct_one(source, out / relative, args, parameters, local_server)
            _say(f"[{number}/{len(pairs)}] {'ok' if ok else 'FAILED'} {source}: {summary}")
            if not ok:
                failed.append(str(source))
    finally:
        if local_server is not None:
            local_server.stop()
    if failed:
        _say(f"{len(failed)} of {len(pairs)} file(s) failed: {', '.join(failed)}")
        return 1
    _say(f"all {len(pairs)} file(s) reconstructed into {out}")
    return 0


def _say(line: str) -> None:
    """One summary line to stderr (under Gadgetron stdout belongs to the server; the logger's prefix would only
    clutter a line a person reads per file)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
