"""Every example in README.md and docs/*.md runs as a newcomer would copy it: an API change that breaks one fails.

What is run, block by block (in a fresh temporary working directory, with one torch thread):

- A ```` ```python ```` block is a **complete program**: it runs on its own in a fresh namespace, so a missing
  import fails. Every block, run or not, must compile, its ``from keel... import NAME`` lines must name what keel
  has, and each ``keel.X`` it uses must resolve after a plain ``import keel`` (``keel.signals`` does not, unless
  imported: the blocks share one process, where it may happen to be loaded already).
- A block that continues the reader's own script ("your model", "inside your loop") says so with an HTML comment
  on the line right above its fence, which GitHub does not render:

  - ``<!-- doc-test: after NAME -->`` runs it after the setup ``NAME`` of `SETUPS` below — the objects such a
    fragment takes for granted (``model``, ``optimizer``, ``loader``, ``loss_fn``, ``keel``, ``torch`` ...). A
    ``...`` line in it stands for the reader's own code and is a no-op. Add ``, slow`` for a setup that takes
    seconds (``<!-- doc-test: after peft, slow -->``): it runs under ``make test-all``.
  - ``<!-- doc-test: skip: REASON -->`` does not run it (it needs several processes, a GPU, a trainer's
    dataset ...); its syntax and keel imports are still checked.

  Any Guard the block leaves open is closed afterwards.
- **Claimed output**: a one-line ``print(...)  # TEXT`` states what it prints; the printed line must match ``TEXT``,
  where ``...`` stands for anything.
- A ```` ```bash ```` (or unlabelled) block's ``keel ...`` commands: every ``--option`` must be one the verb (or
  ``keel bench WHAT``) accepts — always. With ``<!-- doc-test: after NAME -->`` above the block, each command is
  also run (in-process, ``keel.cli.main``) after the setup ``NAME`` and must exit 0. ``skip: REASON`` skips both.
  ``python examples/X.py --opt ...`` (in a block or inline): the script exists and has each option; running the
  examples is left to ``tests/integrations/test_examples.py``. ``make`` and ``pip`` lines are not checked.

``keel ...`` in inline code (`` `keel bench overhead --ddp 2` ``) gets the same option check, and each dotted name
``keel.x.Name`` in inline code must be one keel has (checked in the source).
"""

from __future__ import annotations

import ast
import contextlib
import copy
import functools
import io
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[ \t]*$")
MARKER = re.compile(r"^\s*<!--\s*doc-test:\s*(?P<spec>.*?)\s*-->\s*$")
CLAIMED_PRINT = re.compile(r"^\s*print\(.*\)\s+#\s*(?P<claim>\S.*?)\s*$")
SHELL_LANGS = {"bash", "sh", "shell", "console", ""}


@dataclass(frozen=True)
class Block:
    """One fenced code block of a markdown file."""

    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str  # dedented
    marker: str  # the doc-test comment's text after "doc-test:", or ""

    @property
    def name(self) -> str:
        return str(self.path.relative_to(ROOT)) if self.path.is_relative_to(ROOT) else self.path.name

    @property
    def where(self) -> str:
        return f"{self.name}:{self.line}"

    @property
    def skip_reason(self) -> str | None:
        if not self.marker.startswith("skip"):
            return None
        return self.marker.partition("skip:")[2].strip() or "no reason given"

    @property
    def setup(self) -> str | None:
        match = re.match(r"after\s+(\w+)", self.marker)
        return match.group(1) if match else None

    @property
    def slow(self) -> bool:
        return "slow" in re.split(r"[\s,]+", self.marker)


def read_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of ``path``, each with the doc-test marker on the line above its fence."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        indent = len(opening["indent"])
        code = "\n".join(line[indent:] for line in lines[i + 1 : end])
        above = MARKER.match(lines[i - 1]) if i else None
        blocks.append(Block(path, i + 1, opening["lang"], code, above["spec"] if above else ""))
        i = end + 1
    return blocks


ALL_BLOCKS = [block for path in DOCS for block in read_blocks(path)]
PYTHON_BLOCKS = [b for b in ALL_BLOCKS if b.lang == "python"]
SHELL_BLOCKS = [b for b in ALL_BLOCKS if b.lang in SHELL_LANGS and "keel " in b.code]


# ---------------------------------------------------------------------------------------------------------------
# Setups: what a fragment takes for granted. Each returns the namespace the fragment runs in; all are tiny.


class _PositionSampler:
    """A data-loading position with ``state_dict()``/``load_state_dict()``, what ``guard.track`` takes."""

    def __init__(self, n: int) -> None:
        self.n, self.position = n, 0

    def __iter__(self):
        while self.position < self.n:
            self.position += 1
            yield self.position - 1

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def _lm_setup() -> dict:
    """A loop on keel's tiny proxy LM: ``model``, ``optimizer``, ``scheduler``, ``scaler``, ``loader`` of
    ``(x, y)`` token batches, ``loss_fn``, a ``sampler`` to track, evals ``accuracy(m, test_a)``."""
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, RandomSampler

    import keel
    from keel.proxy import create_proxy_model

    torch.manual_seed(0)
    model = create_proxy_model("tiny")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, 256, (8, 17))
    loader = [(t[:, :-1], t[:, 1:]) for t in tokens.split(2)]  # 4 batches of 2 × 16 tokens

    def loss_fn(logits, y):
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())

    def accuracy(m, test):
        x, y = test
        return (m(x).argmax(-1) == y).float().mean()

    return dict(
        keel=keel,
        torch=torch,
        F=F,
        os=os,
        DataLoader=DataLoader,
        RandomSampler=RandomSampler,
        model=model,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
        scaler=torch.amp.GradScaler("cpu"),
        loader=loader,
        loss_fn=loss_fn,
        sampler=_PositionSampler(6),
        total_steps=3,
        out_dir=".",
        accuracy=accuracy,
        test_a=loader[0],
        test_b=loader[1],
        switch_step=1,
        MyModel=lambda: create_proxy_model("tiny"),
    )


def _guarded_setup() -> dict:
    """`_lm_setup` with an open ``guard`` on it (``run_dir="runs/exp1"``)."""
    namespace = _lm_setup()
    namespace["guard"] = namespace["keel"].Guard(namespace["model"], namespace["optimizer"], run_dir="runs/exp1")
    return namespace


def _data_setup() -> dict:
    """`_lm_setup` for the data tools: a ``dataset`` of ``(index, (x, y))`` items, a ``loader`` of
    ``(ids, batch)``, ``per_example_loss(model, batch)``, a measured ``x_probe``/``y_probe``, and one step's
    ``ids``, ``batch``, ``loss``."""
    import torch.nn.functional as F

    namespace = _lm_setup()
    model = namespace["model"]
    pairs = [pair for x, y in namespace["loader"] for pair in zip(x, y, strict=True)]
    dataset = [(i, pair) for i, pair in enumerate(pairs)]

    def per_example_loss(model, batch):
        x, y = batch
        return F.cross_entropy(model(x).transpose(1, 2), y, reduction="none").mean(1)

    loader: Any = torch.utils.data.DataLoader(dataset, batch_size=2)  # type: ignore[arg-type]
    ids, batch = next(iter(loader))
    namespace.update(
        dataset=dataset,
        loader=loader,
        per_example_loss=per_example_loss,
        ids=ids,
        batch=batch,
        loss=per_example_loss(model, batch).mean(),
        x_probe=torch.stack([x for x, _ in pairs]),  # all 8 examples: the probe's two groups of top_k=4
        y_probe=torch.stack([y for _, y in pairs]),
    )
    return namespace


def _sources_setup() -> dict:
    """`_data_setup` inside a loop over data from several sources: ``batch`` is a dict whose ``"source"`` tags each
    example, ``logits`` the model's output on it and ``targets`` its next tokens."""
    namespace = _data_setup()
    x, y = namespace["batch"]
    namespace.update(batch={"x": x, "y": y, "source": ["web", "code"]}, logits=namespace["model"](x), targets=y)
    return namespace


def _eval_setup() -> dict:
    """`_guarded_setup` with a multiple-choice eval's pieces (``score_options``, ``questions``, ``answers``) and
    a ``dataset`` of 3 tasks (``task_indices``)."""
    namespace = _guarded_setup()

    def score_options(model, questions):  # one loss per (question, option): lower is better
        x, y = questions
        return torch.nn.functional.cross_entropy(model(x).transpose(1, 2), y, reduction="none")

    namespace.update(
        score_options=score_options,
        questions=namespace["loader"][0],
        answers=torch.zeros(2, dtype=torch.long),
        dataset=list(range(30)),
        task_indices=[range(0, 10), range(10, 20), range(20, 30)],
    )
    return namespace


def _tta_setup() -> dict:
    """Test-time adaptation of a classifier: ``model``, ``original`` (its frozen copy), a batch ``x``, and
    ``entropy(logits)`` per example."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))

    def entropy(logits):
        return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)

    return dict(
        torch=torch,
        model=model,
        original=copy.deepcopy(model).requires_grad_(False),
        x=torch.randn(16, 8),
        entropy=entropy,
    )


def _dpo_setup() -> dict:
    """`_lm_setup` for a preference loop: a frozen ``reference`` copy, a ``loader`` of batches with ``chosen`` /
    ``rejected`` token ids and their lengths, and ``policy_logps(model, batch)`` → summed log-probs (B,) each."""
    from types import SimpleNamespace

    namespace = _lm_setup()
    model = namespace["model"]

    def sequence_logp(model, tokens):
        logp = model(tokens[:, :-1]).log_softmax(-1)
        return logp.gather(-1, tokens[:, 1:, None]).squeeze(-1).sum(-1)

    def policy_logps(model, batch):
        return sequence_logp(model, batch.chosen), sequence_logp(model, batch.rejected)

    tokens = torch.randint(0, 256, (2, 2, 2, 17))
    loader = [
        SimpleNamespace(chosen=c, rejected=r, chosen_len=torch.full((2,), 16), rejected_len=torch.full((2,), 16))
        for c, r in tokens
    ]
    namespace.update(reference=copy.deepcopy(model).requires_grad_(False), loader=loader, policy_logps=policy_logps)
    return namespace


def _moe_setup() -> dict:
    """`_lm_setup` with keel's tiny proxy MoE as ``model``."""
    from keel.proxy import MoeConfig, create_proxy_model

    namespace = _lm_setup()
    namespace["model"] = create_proxy_model("tiny", moe=MoeConfig(num_experts=4, top_k=1))
    return namespace


def _peft_setup() -> dict:
    """`_lm_setup` with ``base``: a 2-layer Hugging Face Llama (``q_proj``/``v_proj``), and ``peft``."""
    peft = pytest.importorskip("peft")
    from tests.tiny_hf import tiny_llama

    namespace = _lm_setup()
    namespace.update(base=tiny_llama(), peft=peft)
    return namespace


def _hf_setup() -> dict:
    """A Hugging Face ``Trainer``'s pieces: a 2-layer GPT-2 ``model``, 2-step ``args`` on the CPU, a dataset ``ds``."""
    transformers = pytest.importorskip("transformers")

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    )
    ids = torch.randint(0, 64, (8, 16))
    args = transformers.TrainingArguments(
        output_dir="hf", max_steps=2, per_device_train_batch_size=4, report_to=[], save_strategy="no", use_cpu=True
    )
    return dict(Trainer=transformers.Trainer, model=model, args=args, ds=[{"input_ids": x, "labels": x} for x in ids])


def _trl_setup() -> dict:
    """TRL's ``DPOTrainer`` with its pieces (``model``, ``ref_model``, ``args``, ``pairs``, ``tok``) and a built
    ``trainer``: tests/integrations/_trl_tiny.py's 2-step character-level DPO, nothing downloaded."""
    pytest.importorskip("trl")
    from tests.integrations import _trl_tiny

    trainer = _trl_tiny.dpo_trainer(Path("trl"), steps=2)
    return dict(
        DPOTrainer=type(trainer),
        trainer=trainer,
        model=trainer.model,
        ref_model=trainer.ref_model,
        args=trainer.args,
        pairs=_trl_tiny.preference_data(),
        tok=trainer.processing_class,
    )


def _run_setup() -> dict:
    """A finished keel run in ``runs/exp1`` (a few steps of `_lm_setup`'s loop), for commands that read one."""
    namespace = _lm_setup()
    keel, model, optimizer = namespace["keel"], namespace["model"], namespace["optimizer"]
    with keel.Guard(model, optimizer, run_dir="runs/exp1") as guard:
        for x, y in namespace["loader"]:
            loss = namespace["loss_fn"](model(x), y)
            loss.backward()
            guard.step(loss)
            optimizer.zero_grad()
    return namespace


def _gan_setup() -> dict:
    """A discriminator ``netD`` and generator ``netG`` (small MLPs) with their Adam ``optimizerD`` / ``optimizerG``."""
    import keel

    torch.manual_seed(0)
    netD = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LeakyReLU(0.2), torch.nn.Linear(8, 1))
    netG = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    return dict(
        keel=keel,
        torch=torch,
        netD=netD,
        netG=netG,
        optimizerD=torch.optim.Adam(netD.parameters(), lr=2e-4, betas=(0.5, 0.999)),
        optimizerG=torch.optim.Adam(netG.parameters(), lr=2e-4, betas=(0.5, 0.999)),
    )


SETUPS: dict[str, Callable[[], dict]] = {
    "lm": _lm_setup,
    "guarded": _guarded_setup,
    "data": _data_setup,
    "sources": _sources_setup,
    "eval": _eval_setup,
    "tta": _tta_setup,
    "dpo": _dpo_setup,
    "moe": _moe_setup,
    "peft": _peft_setup,
    "hf": _hf_setup,
    "trl": _trl_setup,
    "run": _run_setup,
    "gan": _gan_setup,
}


# ---------------------------------------------------------------------------------------------------------------
# Running a block.


@pytest.fixture
def newcomer_dir(tmp_path, monkeypatch, one_torch_thread) -> Iterator[Path]:
    """A fresh, empty working directory, as a newcomer's, on one torch thread."""
    monkeypatch.chdir(tmp_path)
    yield tmp_path


def _block_params(blocks: list[Block]) -> list:
    params = []
    for block in blocks:
        marks = [pytest.mark.slow] if block.slow else []
        params.append(pytest.param(block, id=block.where, marks=marks))
    return params


def _compiled(block: Block):
    """The block compiled with its markdown line numbers, so a traceback names the doc's line (``<docs/x.md>:42``)."""
    return compile("\n" * block.line + block.code, f"<{block.name}>", "exec")


def _close_guards(values: list) -> None:
    """Close every Guard (or `keel.watch` handle) among ``values``: its run lock, hooks and signal handlers."""
    from keel.guard import Guard
    from keel.integrations.watch import Watch

    for value in values:
        if isinstance(value, (Guard, Watch)):
            value.close()


def _check_claimed_output(block: Block, printed: str) -> None:
    lines = printed.splitlines()
    for claim in (m["claim"] for m in map(CLAIMED_PRINT.match, block.code.splitlines()) if m):
        pattern = ".*".join(re.escape(part) for part in claim.split("..."))
        assert any(re.fullmatch(pattern, line) for line in lines), (
            f"{block.where}: the block claims it prints {claim!r}; it printed:\n{printed}"
        )


def _keel_source(module: str) -> Path | None:
    """The source file of keel module ``module`` (``keel.integrations.hf``), found without importing it."""
    base = ROOT / "src" / Path(*module.split("."))
    return next((f for f in (base.with_suffix(".py"), base / "__init__.py") if f.is_file()), None)


def _defines(module: str, name: str) -> bool:
    """Whether keel module ``module`` defines ``name`` at its top level (or has it as a submodule)."""
    if module == "keel" and name in _names_after_import_keel():  # keel.Guard & co. load on first use
        return True
    source = _keel_source(module)
    if source is None:
        return False
    if _keel_source(f"{module}.{name}") is not None:
        return True
    names = set()
    for node in ast.parse(source.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return name in names


def _check_keel_imports(block: Block) -> None:
    """Every ``from keel... import NAME`` / ``import keel...`` of a block names something keel has — checked in
    the source, without importing (a skipped block's imports may need an extra)."""
    for node in ast.walk(ast.parse(block.code)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "keel":
            missing = [a.name for a in node.names if not _defines(node.module, a.name)]  # type: ignore[arg-type]
            assert not missing, f"{block.where}: `from {node.module} import` {missing}: keel has no such name"
        elif isinstance(node, ast.Import):
            for alias in (a for a in node.names if a.name.split(".")[0] == "keel"):
                assert _keel_source(alias.name), f"{block.where}: `import {alias.name}`: keel has no such module"


@functools.cache
def _names_after_import_keel() -> frozenset[str]:
    """What ``keel.NAME`` resolves to in a fresh interpreter after ``import keel`` alone (no torch is imported)."""
    probe = "import keel; print(*(n for n in [*dir(keel), *keel.__all__] if not n.startswith('_')))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
    return frozenset(out.stdout.split())


def _check_keel_attributes(block: Block) -> None:
    """``keel.X`` in a block resolves after a plain ``import keel`` (or the block imports ``keel.X`` itself).

    The blocks run in one process, where another block or a setup may have imported ``keel.signals`` already,
    so ``keel.signals.X`` would work here and fail in a newcomer's script: hence checked against a fresh one."""
    tree = ast.parse(block.code)
    imported = {
        alias.name.split(".")[1]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
        if alias.name.startswith("keel.")
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "keel":
            assert node.attr in _names_after_import_keel() | imported, (
                f"{block.name}:{block.line + node.lineno}: keel.{node.attr} fails after `import keel` alone "
                f"(AttributeError); import keel.{node.attr} or the name itself"
            )


@pytest.mark.parametrize("block", _block_params(PYTHON_BLOCKS))
def test_python_block_runs(block: Block, newcomer_dir: Path) -> None:
    code = _compiled(block)  # a SyntaxError fails every block, skipped or not
    _check_keel_imports(block)
    if block.skip_reason is not None:
        pytest.skip(f"{block.where}: {block.skip_reason} (its syntax and keel imports were checked)")
    _check_keel_attributes(block)
    namespace = SETUPS[block.setup]() if block.setup else {}
    from_setup = list(namespace.values())  # a setup's guard the block rebinds is closed too
    namespace["__name__"] = "__main__"
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            exec(code, namespace)
    finally:
        _close_guards([*from_setup, *namespace.values()])
    _check_claimed_output(block, printed.getvalue())


# ---------------------------------------------------------------------------------------------------------------
# keel commands.


def keel_commands(block: Block) -> list[list[str]]:
    """The ``keel ...`` commands of a shell block as argument lists (without ``keel``); ``&&`` chains split,
    backslash continuations joined, comments dropped."""
    commands = []
    for line in block.code.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)  # "&&", "|", ";" become words of their own
        lexer.whitespace_split = True
        command: list[str] = []
        for word in [*lexer, ";"]:
            if word in {"&&", "||", "|", ";", "&"}:
                if command[:1] == ["keel"]:
                    commands.append(command[1:])
                command = []
            else:
                command.append(word)
    return commands


def _accepted_options(argv: list[str]) -> set[str]:
    """The option strings ``keel VERB [WHAT]`` accepts."""
    from keel.cli import build_parser

    parser = build_parser(argv[0])
    verbs: Any = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    actions = verbs[argv[0]]._actions
    sub: Any = next((a for a in actions if a.choices and len(argv) > 1 and argv[1] in a.choices), None)
    if sub is not None:  # keel bench WHAT
        actions = sub.choices[argv[1]]._actions
    return {option for action in actions for option in action.option_strings}


@pytest.mark.parametrize("block", _block_params(SHELL_BLOCKS))
def test_keel_commands_use_real_options(block: Block) -> None:
    if block.skip_reason is not None:
        pytest.skip(f"{block.where}: {block.skip_reason}")
    for argv in keel_commands(block):
        words = (word.strip("[]").split("=")[0] for word in argv)  # a synopsis's [--json] too
        options = {word for word in words if re.fullmatch(r"--?[A-Za-z][\w-]*", word)}
        unknown = options - _accepted_options(argv)
        assert not unknown, f"{block.where}: keel {' '.join(argv)}: no such option {sorted(unknown)}"


EXAMPLE_COMMAND = re.compile(r"examples/(?P<script>\w+\.py)(?P<args>[^`#&|;\n]*)")


def test_example_commands_use_real_options() -> None:
    """``python examples/X.py --opt ...`` in the docs: the script exists and defines each option (read from its
    source: running each script's ``--help`` would import torch once per script)."""
    for path in DOCS:
        for match in EXAMPLE_COMMAND.finditer(path.read_text(encoding="utf-8")):
            script = ROOT / "examples" / match["script"]
            assert script.is_file(), f"{path.name}: examples/{match['script']} does not exist"
            source = script.read_text(encoding="utf-8")
            for option in re.findall(r"(?<![\w-])--[a-z][\w-]*", match["args"]):
                assert f'"{option}"' in source, f"{path.name}: examples/{match['script']} has no option {option}"


def inline_commands(path: Path) -> list[Block]:
    """The ``keel VERB ...`` spans of inline code in ``path``, each as a one-command shell block."""
    from keel.cli import VERBS

    text = path.read_text(encoding="utf-8")
    return [
        Block(path, text.count("\n", 0, match.start()) + 1, "bash", match.group(1), "")
        for match in re.finditer(r"`(keel ([a-z]+)[^`\n]*)`", text)
        if match.group(2) in VERBS
    ]


KEEL_NAME = re.compile(r"(?<![\w.])keel(?:\.[A-Za-z_]\w*)+")


def keel_name_exists(dotted: str) -> bool:
    """Whether ``keel.a.b.Name`` names a keel module, or something its longest module prefix defines."""
    parts = dotted.split(".")
    split = next(i for i in range(len(parts), 0, -1) if _keel_source(".".join(parts[:i])) or i == 1)
    return split == len(parts) or _defines(".".join(parts[:split]), parts[split])


@pytest.mark.parametrize("path", DOCS, ids=lambda path: path.name)
def test_inline_keel_names_exist(path: Path) -> None:
    """``keel.signals.OpposingSignalsProbe`` in the prose's inline code names something keel has (read statically)."""
    text = path.read_text(encoding="utf-8")
    for span in re.finditer(r"`[^`\n]+`", text):
        for dotted in KEEL_NAME.findall(span.group(0)):
            line = text.count("\n", 0, span.start()) + 1
            assert keel_name_exists(dotted), f"{path.name}:{line}: `{dotted}`: keel has no such name"


@pytest.mark.parametrize("path", DOCS, ids=lambda path: path.name)
def test_inline_keel_commands_use_real_options(path: Path) -> None:
    blocks = inline_commands(path)
    for block in blocks:
        test_keel_commands_use_real_options(block)


@pytest.mark.parametrize("block", _block_params([b for b in SHELL_BLOCKS if b.setup]))
def test_keel_commands_run(block: Block, newcomer_dir: Path, capsys) -> None:
    from keel.cli import main

    SETUPS[block.setup]()  # type: ignore[index]
    for argv in keel_commands(block):
        status = main(argv)
        assert status == 0, f"{block.where}: keel {' '.join(argv)} exited {status}: {capsys.readouterr().err}"


def test_every_marker_is_understood() -> None:
    """A typo in a marker would silently run a fragment as a program (and fail confusingly) or skip nothing."""
    for block in ALL_BLOCKS:
        if block.marker:
            assert block.skip_reason is not None or block.setup in SETUPS, f"{block.where}: {block.marker!r}"
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        fenced = {b.line - 1 for b in read_blocks(path) if b.marker}
        for number, line in enumerate(text.splitlines(), start=1):
            if "doc-test:" in line and MARKER.match(line):
                assert number in fenced, f"{path.name}:{number}: a doc-test marker not right above a code fence"


def test_the_docs_hold_examples() -> None:
    """The parsers still find the examples (a change of fence style would make every test above vacuous)."""
    assert len(PYTHON_BLOCKS) >= 30 and len(SHELL_BLOCKS) >= 5
    assert sum(len(inline_commands(path)) for path in DOCS) >= 30
