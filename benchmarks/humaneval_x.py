"""HumanEval-X translation harness: problems, target programs, and a sandboxed runner.

A translation of problem P from language A to B is judged by B's own tests: the program is
B's import lines (those the translation lacks) + the translation + B's `test`, compiled
and run with this machine's toolchain. Two adaptations keep the judgement about the code
rather than about file layout, the same for every model:
- Java: a translation without `class Solution` is wrapped in one (the tests call
  `new Solution().method(...)`); imports stay outside.
- Rust: `fn main(){}` is added when the translation has none (the declaration has it);
  `use` lines of crates that are not installed here (rand, regex, md5) are dropped, and
  the few problems whose reference solution needs one of them are marked unrunnable.
Go's tests need the `testify` module, which cannot be fetched offline: Go is skipped as a
target (it is still a source language) unless `go` and that module are both present.

Programs run in a fresh temporary directory, with a wall-clock limit, an address-space
limit (a heap limit for the JVM), a file-size limit, a minimal environment, and no network
(a new network namespace via `unshare -n` when the machine allows it; the report says
whether it did).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import resource
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path


def shared_data() -> Path:
    """The project's shared data folder: $CODEVISTA_SHARED_DATA, else `shared/data` beside
    the repository (as on the development machines)."""
    env = os.environ.get("CODEVISTA_SHARED_DATA")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[1]
    for base in (repo.parent, repo, Path("/work")):
        if (base / "shared" / "data").is_dir():
            return base / "shared" / "data"
    return repo.parent / "shared" / "data"


# HumanEval-X file suffix -> codevista language id
DATASET_LANGS = {"python": "python", "cpp": "cpp", "java": "java", "js": "javascript",
                 "go": "go", "rust": "rust"}
MISSING_RUST_CRATES = ("rand", "regex", "md5")


@dataclass(frozen=True)
class Problem:
    task: str  # "HumanEval/0"
    language: str  # codevista id
    declaration: str
    solution: str
    test: str
    imports: str = ""  # Go's import block

    @property
    def source(self) -> str:
        """The code a translator gets: declaration plus body (and Go's imports)."""
        head = (self.imports.rstrip() + "\n\n") if self.imports.strip() else ""
        return (head + self.declaration + self.solution).strip("\n") + "\n"

    @property
    def number(self) -> int:
        return int(self.task.split("/")[1])


def load_problems(root: Path) -> dict[str, dict[int, Problem]]:
    """{language: {number: Problem}} for the six HumanEval-X languages."""
    out: dict[str, dict[int, Problem]] = {}
    for suffix, lang in DATASET_LANGS.items():
        path = root / f"humaneval_{suffix}.jsonl.gz"
        rows = [json.loads(line) for line in gzip.open(path, "rt", encoding="utf-8")]
        problems = [Problem(r["task_id"], lang, r["declaration"], r["canonical_solution"],
                            r["test"], r.get("import", "")) for r in rows]
        out[lang] = {p.number: p for p in problems}
    return out


# -- program assembly ---------------------------------------------------------------------

_IMPORT_LINE = {
    "python": re.compile(r"^(from\s+\S+\s+import\s.+|import\s.+)$"),
    "cpp": re.compile(r"^\s*(#include.*|using\s+namespace\s+\w+\s*;)\s*$"),
    "java": re.compile(r"^\s*import\s+[\w.*]+\s*;\s*$"),
    "rust": re.compile(r"^\s*use\s+.+;\s*$"),
    "javascript": re.compile(r"^\s*(const|let|var)\s+.+=\s*require\(.+$"),
}


def header_lines(problem: Problem) -> list[str]:
    pattern = _IMPORT_LINE.get(problem.language)
    if pattern is None:
        return []
    return [ln for ln in problem.declaration.split("\n") if pattern.match(ln)]


def _rust_crate_free(lines: list[str]) -> list[str]:
    return [ln for ln in lines
            if not re.match(rf"^\s*use\s+({'|'.join(MISSING_RUST_CRATES)})\b", ln)]


# Problems whose reference (declaration + canonical solution + test) is itself broken in
# the published data, found by running the "perfect translator" (each language's own
# canonical solution) through this harness; they are left out of every direction into
# that language, so that the harness scores 100 % on everything it keeps.
KNOWN_DEFECTS = {
    ("python", 142): "the declaration ends in an unterminated string literal",
    ("javascript", 112): "the canonical solution fails its own test",
    ("javascript", 155): "the canonical solution returns [0, 0] for 0; the test wants [1, 0]",
    ("cpp", 38): "the declaration holds half of the solution, which is then repeated",
}


def unrunnable_reason(problem: Problem) -> str | None:
    """Why `problem` cannot be judged here (as a target), or None."""
    defect = KNOWN_DEFECTS.get((problem.language, problem.number))
    if defect is not None:
        return defect
    code = problem.declaration + problem.solution
    no_use = "\n".join(ln for ln in (code + problem.test).split("\n")
                       if not ln.lstrip().startswith("use "))
    if problem.language == "rust" and re.search(r"\b(rand|regex|md5|Regex|Rng)\b", no_use):
        return "the reference solution needs a crate that is not installed"
    if problem.language == "cpp" and "boost/" in code and not Path("/usr/include/boost").is_dir():
        return "the reference solution needs Boost headers (libboost-dev)"
    if problem.language == "cpp" and "openssl/" in code and \
            not Path("/usr/include/openssl").is_dir():
        return "the reference solution needs OpenSSL headers (libssl-dev)"
    if problem.language == "javascript":
        for module in re.findall(r"require\(['\"]([^'\"]+)['\"]\)", code):
            probe = subprocess.run(["node", "-e", f"require.resolve({module!r})"],
                                   capture_output=True)
            if probe.returncode != 0:
                return f"the reference solution needs the npm module {module!r}"
    return None


def runnable(problem: Problem) -> bool:
    return unrunnable_reason(problem) is None


def assemble(target: Problem, translation: str) -> tuple[str, str]:
    """(file name, program text) testing `translation` with `target`'s tests."""
    lang = target.language
    code = translation.strip("\n") + "\n"
    present = {ln.strip() for ln in code.split("\n")}
    header = [ln for ln in header_lines(target) if ln.strip() not in present]
    if lang == "rust":
        header = _rust_crate_free(header)
        code = "\n".join(_rust_crate_free(code.split("\n")))
        if not re.search(r"\bfn\s+main\s*\(", code):
            code = "fn main(){}\n" + code
        return "prog.rs", "\n".join(header) + "\n" + code + "\n" + target.test
    if lang == "java":
        if not re.search(r"\bclass\s+Solution\b", code):
            lines = code.split("\n")
            imports = [ln for ln in lines if _IMPORT_LINE["java"].match(ln)]
            body = [ln for ln in lines if not _IMPORT_LINE["java"].match(ln)]
            code = "\n".join(imports) + "\nclass Solution {\n" + "\n".join(body) + "\n}\n"
        return "Main.java", "\n".join(header) + "\n" + code + "\n" + target.test
    name = {"python": "prog.py", "cpp": "prog.cpp", "javascript": "prog.js",
            "go": "prog_test.go"}[lang]
    if lang == "go":
        return name, target_go(target, code)
    return name, "\n".join(header) + "\n" + code + "\n" + target.test + "\n"


def target_go(target: Problem, code: str) -> str:
    code = re.sub(r"^\s*package\s+\w+\s*$", "", code, flags=re.M)
    setup = ("package main\n\nimport (\n    \"testing\"\n"
             "    \"github.com/stretchr/testify/assert\"\n)\n")
    return setup + code + "\n" + target.test


# -- sandbox -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Outcome:
    passed: bool
    stage: str  # "ok" | "compile" | "run" | "timeout"
    detail: str = ""


class Sandbox:
    """Runs commands in throwaway directories with limits and, where possible, no network."""

    def __init__(self, timeout_s: float = 10.0, compile_timeout_s: float = 60.0,
                 memory_bytes: int = 2 << 30) -> None:
        self.timeout_s = timeout_s
        self.compile_timeout_s = compile_timeout_s
        self.memory_bytes = memory_bytes
        self.isolation = self._probe_isolation()

    @staticmethod
    def _probe_isolation() -> list[str]:
        for prefix in (["unshare", "-n"], ["unshare", "-rn"]):
            if shutil.which(prefix[0]) is None:
                return []
            try:
                if subprocess.run(prefix + ["true"], capture_output=True,
                                  timeout=10).returncode == 0:
                    return prefix
            except (OSError, subprocess.SubprocessError):
                pass
        return []

    @property
    def network_isolated(self) -> bool:
        return bool(self.isolation)

    def _limits(self, address_space: bool):
        memory = self.memory_bytes

        def apply() -> None:
            os.setsid()
            if address_space:
                resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
            resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 20, 64 << 20))
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        return apply

    def run(self, cmd: list[str], cwd: Path, timeout: float, address_space: bool = True
            ) -> tuple[int | None, str]:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(cwd),
               "LANG": "C.UTF-8", "TMPDIR": str(cwd)}
        if "CARGO_HOME" in os.environ or "RUSTUP_HOME" in os.environ:
            env.update({k: os.environ[k] for k in ("CARGO_HOME", "RUSTUP_HOME")
                        if k in os.environ})
        elif Path("/root/.rustup").exists():
            env["RUSTUP_HOME"] = "/root/.rustup"
        try:
            proc = subprocess.Popen(self.isolation + cmd, cwd=cwd, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    preexec_fn=self._limits(address_space))
        except OSError as e:
            return 127, str(e)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.communicate()
            return None, "timeout"
        return proc.returncode, out.decode("utf-8", "replace")[-2000:]


def toolchains() -> dict[str, str | None]:
    """Per target language: None if it can run here, else why it is skipped."""
    def need(*tools: str) -> str | None:
        missing = [t for t in tools if shutil.which(t) is None]
        return f"{', '.join(missing)} not installed" if missing else None

    out = {"python": need("python3"), "cpp": need("g++"), "java": need("javac", "java"),
           "javascript": need("node"), "rust": need("rustc")}
    go = need("go")
    if go is None:
        cache = subprocess.run(["go", "env", "GOMODCACHE"], capture_output=True, text=True)
        if not (Path(cache.stdout.strip()) / "github.com/stretchr").is_dir():
            go = "the testify module the Go tests import is not available offline"
    out["go"] = go
    return out


def check(sandbox: Sandbox, target: Problem, translation: str) -> Outcome:
    name, program = assemble(target, translation)
    with tempfile.TemporaryDirectory(prefix="cv-hx-") as tmp:
        d = Path(tmp)
        (d / name).write_text(program, encoding="utf-8")
        lang = target.language
        compile_cmd: list[str] | None = None
        run_cmd: list[str]
        as_limit = True
        if lang == "python":
            run_cmd = ["python3", "-I", name]
        elif lang == "javascript":
            run_cmd = ["node", "--max-old-space-size=512", name]
            as_limit = False  # V8 reserves far more address space than it uses
        elif lang == "cpp":
            compile_cmd = ["g++", "-std=c++17", "-O0", "-w", "-o", "prog", name]
            if "openssl/" in program:
                compile_cmd.append("-lcrypto")
            run_cmd = ["./prog"]
        elif lang == "java":
            compile_cmd = ["javac", "-J-Xmx512m", "-nowarn", name]
            run_cmd = ["java", "-Xmx512m", "-Xss8m", "-cp", ".", "Main"]
            as_limit = False  # the JVM reserves address space; its heap is limited instead
        elif lang == "rust":
            compile_cmd = ["rustc", "--edition", "2021", "--test", "-A", "warnings",
                           "-o", "prog", name]
            run_cmd = ["./prog", "--test-threads=1"]
        elif lang == "go":
            compile_cmd = None
            run_cmd = ["go", "test", name]
        else:
            raise ValueError(lang)
        if compile_cmd is not None:
            rc, out = sandbox.run(compile_cmd, d, sandbox.compile_timeout_s,
                                  address_space=lang not in ("java",))
            if rc != 0:
                return Outcome(False, "timeout" if rc is None else "compile", out[-500:])
        rc, out = sandbox.run(run_cmd, d, sandbox.timeout_s, address_space=as_limit)
        if rc is None:
            return Outcome(False, "timeout")
        if rc != 0 or (lang == "javascript" and "Assertion failed" in out):
            return Outcome(False, "run", out[-500:])
        return Outcome(True, "ok")
