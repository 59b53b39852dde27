#!/usr/bin/env python3
"""Issue #16's three speed targets, on bench/run.py's image and domain.

    .venv/bin/python bench/trust.py --no-page-reporting      # ~4 min: 3 runs of each
    .venv/bin/python bench/trust.py --quick                  # 1 run

1. ``vmbk-backup`` full of the running no-OS domain (3.5 GiB of data in
   6 GiB), with manifests (the stream digest on the write path, the
   signed manifest) against the same command with both switched off
   (``--worker off``: the writer's SHA-256 replaced by a no-op, no
   manifest written; everything else the same).  Target: <= 1.10x.
2. ``vmbk-restore --verify`` of that point (structure, adler32, stream
   digest, manifests) against ``sha256sum`` of the same files.  Target:
   >= 0.9x sha256sum's speed.
3. ``vmbk-replicate --all`` to a local destination encrypted to an age
   recipient, against the ``age`` CLI encrypting the same files to the
   same recipient (``age -R``), both into the output directory and
   fsynced.  Target: >= 0.8x age's speed.

Best of N runs, interleaved; outputs on /dev/shm unless --out-dir.  Uses
run.py's helpers (image cache, domain, page reporting, the timing lock).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as common  # noqa: E402  bench/run.py
from run import Proc, measure, rotate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
B_ON, B_OFF = "vmbk-backup full, with manifests", "vmbk-backup full, no digest, no manifest"
B_B3 = "vmbk-backup full, BLAKE3 stream digest (experiment)"
V_VMBK, V_SHA = "vmbk-restore --verify of the point", "sha256sum of the same files"
E_VMBK, E_AGE = "vmbk-replicate, encrypted (age recipient)", "age -R of the same files"


def worker_main(argv: list[str]) -> int:
    """``--worker on|off ARGV``: vmbk-backup in this process; ``off`` hashes nothing, writes no manifest."""
    mode, rest = argv[0], argv[1:]
    if mode == "blake3":  # what the stream digest would cost with BLAKE3 (`pip install blake3`): an experiment
        import blake3  # type: ignore[import-not-found]

        import vmbk.stream.writer as w

        class B3:
            sha256 = blake3.blake3

        w.hashlib = B3  # type: ignore[assignment]
    if mode == "off":
        import vmbk.manifest.write as mw
        import vmbk.stream.writer as w

        class Null:
            def __init__(self, *_a: object) -> None: ...
            def update(self, _b: object) -> None: ...
            def digest(self) -> bytes: return b""
            def hexdigest(self) -> str: return ""

        class NoHash:
            sha256 = Null

        w.hashlib = NoHash  # type: ignore[assignment]
        mw.write_point = lambda *a, **k: None  # type: ignore[assignment]
    from vmbk.commands.backup import main
    return main(rest)


class Trust(common.Bench):
    def __init__(self, opts: argparse.Namespace) -> None:
        super().__init__(opts)
        self.cases = {n: common.Case("trust", n) for n in (B_ON, B_OFF, B_B3, V_VMBK, V_SHA, E_VMBK, E_AGE)}

    def backup(self, root: Path, mode: str) -> Proc:
        self.delete_checkpoints()
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        p = measure([sys.executable, str(Path(__file__).resolve()), "--worker", mode, "--vm", self.name,
                     "--backup-path", str(root), "--json"], env=self.env, fsync_dir=root)
        recs = [json.loads(line) for line in p.stdout.splitlines() if line.strip()]
        if not recs or recs[-1].get("outcome") != "ok" or recs[-1].get("action") != "full":
            raise RuntimeError(f"no full backup: {p.stdout[-2000:]} {p.stderr[-2000:]}")
        return p

    def section(self) -> None:
        assert self.out is not None and self.image is not None
        data = self.image.data
        roots = {B_ON: self.out / "on", B_OFF: self.out / "off", B_B3: self.out / "b3"}
        modes = {B_ON: "on", B_OFF: "off", B_B3: "blake3"}
        lines = [B_ON, B_OFF] + ([B_B3] if "blake3" in self.opts.only else [])
        for i in range(self.runs if "backup" in self.opts.only else 0):
            for name in rotate(lines, i):
                self.timed(name, lambda n=name: self.backup(roots[n], modes[n]), data)
        shutil.rmtree(roots[B_B3], ignore_errors=True)
        if "backup" not in self.opts.only:
            self.backup(roots[B_ON], "on")  # the point the other sections read
        shutil.rmtree(roots[B_OFF], ignore_errors=True)
        root = roots[B_ON]
        chain = next(p.parent for p in root.rglob("vda.full.data"))
        files = sorted(str(p) for p in chain.rglob("*") if p.is_file())
        size = sum(os.path.getsize(f) for f in files)
        vmbk_restore = str(common.VENV_BIN / "vmbk-restore")
        for i in range(self.runs if "verify" in self.opts.only else 0):
            for name in rotate([V_VMBK, V_SHA], i):
                if name == V_VMBK:
                    self.timed(name, lambda: measure([vmbk_restore, "--verify", self.name, "--backup-path",
                                                      str(root), "--json"], env=self.env), size)
                else:
                    self.timed(name, lambda: measure(["sha256sum", *files]), size)
        ident = subprocess.run(["age-keygen"], capture_output=True, text=True, check=True).stdout
        rec = next(ln.split(": ")[1] for ln in ident.splitlines() if ln.startswith("# public key: "))
        recipients = self.out / "recipients.txt"
        recipients.write_text(rec + "\n")
        cfg = self.out / "replicate-config"
        cfg.mkdir()
        enc_dir = self.out / "encrypted"
        (cfg / "default.toml").write_text(f'[[replication]]\nname = "enc"\ntransport = "local"\npath = '
                                          f'"{enc_dir}"\nverify = "none"\nencrypt = {{ recipients = ["{rec}"] }}\n')
        age_dir = self.out / "age-cli"
        script = ('set -e; cd "$1"; out="$2"; shift 2; for f in "$@"; do mkdir -p "$out/$(dirname "$f")"; '
                  'age -R "$RECIPIENTS" -o "$out/$f.age" "$f"; done')
        rels = [str(Path(f).relative_to(root)) for f in files]
        env = {**self.env, "VMBK_CONFIG_DIR": str(cfg), "RECIPIENTS": str(recipients)}
        vmbk_replicate = str(common.VENV_BIN / "vmbk-replicate")

        def ours() -> Proc:
            shutil.rmtree(enc_dir, ignore_errors=True)
            enc_dir.mkdir()
            return measure([vmbk_replicate, "--all", "--backup-path", str(root), "--json"], env=env,
                           fsync_dir=enc_dir)

        def theirs() -> Proc:
            shutil.rmtree(age_dir, ignore_errors=True)
            age_dir.mkdir()
            return measure(["sh", "-c", script, "sh", str(root), str(age_dir), *rels], env=env, fsync_dir=age_dir)

        for i in range(self.runs if "encrypt" in self.opts.only else 0):
            for name in rotate([E_VMBK, E_AGE], i):
                self.timed(name, ours if name == E_VMBK else theirs, size)

    def report(self) -> None:
        print("\n" + "\n".join(self.facts))
        print(f"\n{'line':46} {'best s':>7} {'MB/s':>6} {'CPU s':>6}  runs")
        for c in self.cases.values():
            if c.runs:
                runs = " ".join(f"{r.seconds:.2f}" for r in c.runs)
                print(f"{c.name:46} {c.best.seconds:7.2f} {c.rate:6.0f} {c.best.cpu:6.2f}  {runs}")
        b = {n: c.best.seconds for n, c in self.cases.items() if c.runs}
        if B_ON in b and B_OFF in b:
            r = b[B_ON] / b[B_OFF]
            print(f"\nbackup with manifests / without: {r:.3f}x  (target <= 1.10)  {'PASS' if r <= 1.10 else 'FAIL'}")
        if V_VMBK in b and V_SHA in b:
            r = b[V_SHA] / b[V_VMBK]
            print(f"verify speed / sha256sum's: {r:.2f}x  (target >= 0.9)  {'PASS' if r >= 0.9 else 'FAIL'}")
        if E_VMBK in b and E_AGE in b:
            r = b[E_AGE] / b[E_VMBK]
            print(f"encrypted replication speed / age's: {r:.2f}x  (target >= 0.8)  {'PASS' if r >= 0.8 else 'FAIL'}")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        return worker_main(sys.argv[2:])
    ap = common.bench_parser(__doc__)
    ap.add_argument("--only", default="backup,verify,encrypt", help="sections: backup,verify,encrypt")
    opts = ap.parse_args()
    opts.cold = False
    opts.only = set(opts.only.split(","))
    opts.keep_cache = True
    _lock = common.start_session("lock", "bench/trust.py")  # noqa: F841 -- holding it keeps other benches out
    bench = Trust(opts)

    def body() -> None:
        assert bench.work is not None
        bench.env["VMBK_KEY_DIR"] = str(bench.work / "keys")  # the bench's own signing key
        bench.section()

    return common.run_bench(bench, body, opts.no_page_reporting)


if __name__ == "__main__":
    sys.exit(main())
