"""Package CDL-Λ for Siemens OpenRecon: the label, the image, ``docker save`` tar + PDF, zipped.

Run from the repository root: ``python docker/openrecon/package.py [--gpu] [--out dist/openrecon]``. Steps:

1. the label JSON from the package (:mod:`cdl_lambda.gadgets.openrecon_label`), validated against
   ``docker/openrecon/OpenReconSchema_1.1.0.json`` (jsonschema) → ``OpenReconLabel.json``;
2. the PDF (this folder's README.md rendered as pages with Pillow) → ``<base>.pdf``;
3. ``docker build`` of ``Dockerfile`` (``Dockerfile.cuda`` with ``--gpu``) with the label as a build argument;
4. ``docker save`` → ``<base>.tar``;
5. ``<base>.zip`` holding the tar and the PDF (deflate).

``<base>`` is ``OpenRecon_<vendor>_<name>_V<version>`` and the image tag its lower-case form, as OpenRecon expects.
OpenRecon packaging expects Docker Engine below 25: a newer engine is refused. Without a Docker engine steps 3–5
cannot run: the script says so, leaves the label and the PDF, and exits with status 3.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SCHEMA = HERE / "OpenReconSchema_1.1.0.json"
MAX_DOCKER_MAJOR = 24
NO_DOCKER = 3


def validate(label: dict) -> None:
    """ValueError listing every schema violation of ``label``."""
    try:
        import jsonschema
    except ModuleNotFoundError:
        raise ValueError("validating the label needs jsonschema: pip install jsonschema") from None
    validator = jsonschema.Draft7Validator(json.loads(SCHEMA.read_text()))
    errors = sorted(validator.iter_errors(label), key=lambda e: list(e.path))
    if errors:
        raise ValueError("the OpenRecon label does not validate: "
                         + "; ".join(f"{'/'.join(map(str, e.path)) or '(root)'}: {e.message}" for e in errors))


def base_name(label: dict) -> str:
    general = label["general"]
    return f"OpenRecon_{general['vendor']}_{general['name']['en']}_V{general['version']}"


ASCII = {"Λ": "Lambda", "−": "-", "…": "...", "²": "^2", "—": "-", "≥": ">=", "≤": "<="}


def text_lines(markdown: str, width: int = 100) -> list[str]:
    """``markdown`` as plain lines: paragraphs joined and wrapped at ``width``, table rows and code kept."""
    for old, new in ASCII.items():
        markdown = markdown.replace(old, new)
    lines, paragraph = [], []
    for line in markdown.splitlines() + [""]:
        if line.strip() and not line.startswith(("|", "#", "    ", "```")):
            paragraph.append(line.strip())
            continue
        if paragraph:
            lines += textwrap.wrap(" ".join(paragraph), width)
            paragraph = []
        lines += textwrap.wrap(line, width, subsequent_indent="    ") or [""]
    return lines


def write_pdf(markdown: str, path: Path) -> None:
    """``markdown`` as plain text on A4 pages (100 dpi), one PDF."""
    from PIL import Image, ImageDraw, ImageFont
    width, height, margin, line_height = 827, 1169, 60, 17
    try:
        font = ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        font = ImageFont.load_default()
    lines = text_lines(markdown)
    per_page = (height - 2 * margin) // line_height
    pages = []
    for start in range(0, max(len(lines), 1), per_page):
        page = Image.new("L", (width, height), 255)
        draw = ImageDraw.Draw(page)
        for row, line in enumerate(lines[start:start + per_page]):
            draw.text((margin, margin + row * line_height), line, fill=0, font=font)
        pages.append(page.convert("RGB"))
    pages[0].save(path, format="PDF", save_all=True, append_images=pages[1:], resolution=100.0)


def docker_problem(docker: str) -> str | None:
    """Why the Docker steps cannot run (None: they can)."""
    if shutil.which(docker) is None:
        return f"no Docker engine here (`{docker}` not found)"
    done = subprocess.run([docker, "version", "--format", "{{.Server.Version}}"], capture_output=True, text=True)
    if done.returncode != 0:
        return f"`{docker} version` failed: {(done.stderr or done.stdout).strip()[:300]}"
    version = done.stdout.strip()
    try:
        major = int(version.split(".")[0])
    except ValueError:
        return f"cannot read the Docker engine version from {version!r}"
    if major > MAX_DOCKER_MAJOR:
        return (f"Docker Engine {version}: OpenRecon packaging expects an engine below {MAX_DOCKER_MAJOR + 1} "
                "(images saved by newer engines are refused by the scanner)")
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpu", action="store_true", help="the CUDA image (Dockerfile.cuda)")
    parser.add_argument("--out", default="dist/openrecon", help="output folder")
    parser.add_argument("--date", default=None, help="manufacture date YYYY/MM/DD (default: today, UTC)")
    parser.add_argument("--docker", default="docker", help="the docker command")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from cdl_lambda.gadgets.openrecon_label import build_label, encode_label

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    label = build_label(gpu=args.gpu, manufacture_date=args.date)
    try:
        validate(label)
    except ValueError as error:
        print(f"refusing to package: {error}", file=sys.stderr)
        return 2
    (out / "OpenReconLabel.json").write_text(json.dumps(label, indent=2, ensure_ascii=False) + "\n")
    base = base_name(label)
    pdf = out / f"{base}.pdf"
    write_pdf((HERE / "README.md").read_text(), pdf)
    print(f"1. label: {out / 'OpenReconLabel.json'} (valid against {SCHEMA.name})")
    print(f"2. documentation: {pdf}")

    problem = docker_problem(args.docker)
    if problem:
        print(f"cannot run steps 3-5 (docker build, docker save, zip): {problem}", file=sys.stderr)
        return NO_DOCKER
    tag = f"{base.rsplit('_V', 1)[0].lower()}:v{label['general']['version']}"
    dockerfile = HERE / ("Dockerfile.cuda" if args.gpu else "Dockerfile")
    subprocess.run([args.docker, "build", "-f", str(dockerfile), "--build-arg",
                    f"OPENRECON_LABEL={encode_label(label)}", "-t", tag, str(ROOT)], check=True)
    print(f"3. image: {tag}")
    tar = out / f"{base}.tar"
    subprocess.run([args.docker, "save", "-o", str(tar), tag], check=True)
    print(f"4. saved: {tar}")
    archive = out / f"{base}.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as bundle:
        bundle.write(tar, tar.name)
        bundle.write(pdf, pdf.name)
    print(f"5. package: {archive}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
