"""The three ways `phitune infer` talks: one `--prompt`, prompts piped on stdin, a chat REPL.

Answers go to the real stdout (streamed, or one JSON line each with --json); everything
else — the REPL's banner and prompt, --stats, errors inside a chat — goes to stderr, so
`answer=$(phitune infer -m D --prompt ...)` captures the answer and nothing else.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

from phitune import ui
from phitune.errors import OptionError, PhituneError
from phitune.infer.options import InferOptions, Sampling
from phitune.infer.session import Answer, Session

PLACEHOLDER = "{input}"
HELP = ("/adapter NAME switches adapter (/adapter none: the base model, /adapter alone lists "
        "them), /reset forgets the conversation, /quit or Ctrl-D leaves")


def make_template(template: str | None) -> str | None:
    """`--template` with the shell's `\\n` escapes turned into newlines; it must hold {input}."""
    if template is None:
        return None
    from phitune.data import unescape
    text = unescape(template)
    if PLACEHOLDER not in text:
        raise OptionError("--template has no {input} placeholder", "--template",
                          r'write where the prompt goes, e.g. "<|user|>\n{input}<|end|>'
                          r'\n<|assistant|>\n"')
    return text


@dataclass
class Conversation:
    """The turns so far. With the model's chat template the whole history is re-rendered as
    messages; with --template each past turn is its template text plus the answer's tokens
    (the closing end marker included, exactly as the model produced it)."""

    template: str | None = None
    turns: list[tuple[str, Answer]] = field(default_factory=list)

    def prompt_ids(self, session: Session, text: str) -> list[int]:
        if self.template is None:
            messages = []
            for user, answer in self.turns:
                messages += [{"role": "user", "content": user},
                             {"role": "assistant", "content": answer.text}]
            messages.append({"role": "user", "content": text})
            return session.prompt_ids(session.chat_prompt(messages))
        ids: list[int] = []
        for user, answer in self.turns:
            ids += session.encode(self.template.replace(PLACEHOLDER, user)) + answer.ids
        # the conversation starts once, as the model's sequences start; later turns do not
        return session.sequence(ids + session.encode(self.template.replace(PLACEHOLDER, text)))

    def reset(self) -> None:
        self.turns.clear()


@dataclass
class Chat:
    """What every mode shares: the session, the options, and how an answer is shown."""

    session: Session
    sampling: Sampling
    template: str | None = None
    stats: bool = False

    def answer(self, conversation: Conversation, text: str, chat: bool = False) -> Answer:
        """Answer `text` after the conversation so far. In a chat (the REPL) Ctrl-C ends only
        this answer, and the KV cache is kept so the next turn prefills only its new tokens."""
        ids = conversation.prompt_ids(self.session, text)
        stream = None if ui.json_mode() else ui.emit
        answer = self.session.generate(ids, self.sampling, on_text=stream,
                                       interruptible=chat, keep=chat)
        if ui.json_mode():
            ui.emit(json.dumps(answer.summary()) + "\n")
        elif not answer.text.endswith("\n") or not answer.text:
            ui.emit("\n")
        if answer.interrupted:
            ui.info("[dim](interrupted)[/dim]")
        if self.stats:
            rate = f"{answer.tok_per_s:.1f} tok/s" if answer.tok_per_s is not None else "– tok/s"
            cached = f", {answer.cached_tokens} cached" if answer.cached_tokens else ""
            ui.info(f"[dim]time to first token {answer.ttft_s * 1000:.0f} ms (prompt "
                    f"{answer.prompt_tokens} tokens{cached}) · decode {rate} · "
                    f"{answer.tokens} tokens[/dim]")
        return answer

    def one_shot(self, text: str) -> None:
        self.answer(Conversation(self.template), text)

    def stdin_lines(self) -> None:
        """One prompt a line, each its own conversation; blank lines are skipped, and so is a
        line that is not UTF-8 text (said on stderr with its number): the next one is read."""
        source = getattr(sys.stdin, "buffer", None)
        for number, line in enumerate(source if source is not None else sys.stdin, 1):
            if isinstance(line, bytes):
                try:
                    line = line.decode("utf-8")
                except UnicodeDecodeError as exc:
                    ui.error_line(f"warning: stdin line {number} is not UTF-8 text (byte "
                                  f"{exc.start + 1}); skipped it")
                    continue
            text = line.rstrip("\r\n")
            if text.strip():
                self.answer(Conversation(self.template), text)

    def repl(self) -> None:
        conversation = Conversation(self.template)
        from rich.markup import escape
        ui.info(f"[bold]chat with {escape(str(self.session.model_dir))}[/bold] "
                f"(adapter: {self.session.active or 'none'}) — {HELP}")
        while True:
            if not self.session.chat_ready(self.sampling):
                # Allocating the KV cache takes seconds at full size: before the prompt (at
                # the start, after an adapter switch), not inside the next answer's latency.
                self.session.prepare_chat(self.sampling)
            try:
                text = _ask(f"[{self.session.active}] >>> " if self.session.active else ">>> ")
            except (EOFError, KeyboardInterrupt):
                _end_prompt_line()
                return
            text = text.strip()
            if not text:
                continue
            if text.startswith("/"):
                if not self._command(text, conversation):
                    return
                continue
            try:
                answer = self.answer(conversation, text, chat=True)
            except PhituneError as exc:  # a too-long chat: say so, keep the REPL
                ui.error_line(exc.line())
                continue
            if not answer.interrupted:
                conversation.turns.append((text, answer))

    def _command(self, text: str, conversation: Conversation) -> bool:
        """Run a /command; False means leave the REPL."""
        command, _, arg = text.partition(" ")
        arg = arg.strip()
        if command in ("/quit", "/exit", "/q"):
            return False
        if command == "/reset":
            conversation.reset()
            ui.info("[dim]conversation reset[/dim]")
        elif command == "/adapter" and arg:
            try:
                self.session.activate(arg, where="/adapter")
            except PhituneError as exc:
                ui.error_line(exc.line())
            else:
                ui.info(f"[dim]adapter: {self.session.active or 'none (base model)'}[/dim]")
        elif command == "/adapter":
            names = ", ".join(self.session.adapter_names) or "none loaded"
            ui.info(f"adapters: {names}; active: {self.session.active or 'none (base model)'}")
        else:
            ui.info(HELP)
        return True


def _ask(prompt: str) -> str:
    """Read one line; with the real terminal on both ends, with readline's editing and history."""
    terminal = _terminal()
    if terminal is None:
        return input(prompt)  # sys.stdout points at stderr while a command runs
    import readline  # noqa: F401  (input() uses it once imported)
    saved, sys.stdout = sys.stdout, terminal
    try:
        return input(prompt)
    finally:
        sys.stdout = saved


def _terminal():
    """The real stdout when stdin and stdout are both the process's terminal, else None."""
    real = sys.__stdout__
    if sys.stdin is sys.__stdin__ and real is not None and real.isatty():
        return real
    return None


def _end_prompt_line() -> None:
    """After Ctrl-D or Ctrl-C at the prompt: a newline where the prompt went."""
    out = _terminal() or sys.stdout
    out.write("\n")
    out.flush()


def run(options: InferOptions) -> None:
    """Check every option, load once, then answer in the mode stdin and --prompt select."""
    from phitune.infer.adapters import plan
    template = make_template(options.template)
    sampling = Sampling(**{f.name: getattr(options, f.name) for f in fields(Sampling)})
    sampling.validate()
    if options.prompt is not None:
        try:  # the shell passes bytes that are not UTF-8 through as lone surrogates
            options.prompt.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise OptionError(f"--prompt is not UTF-8 text (character {exc.start + 1})",
                              "--prompt", "pass the prompt as UTF-8 text") from None
    if options.prompt is None and sys.stdin is None:  # started with stdin closed (`<&-`)
        raise OptionError("no --prompt and stdin is closed", "phitune infer",
                          "pass --prompt TEXT, pipe prompts on stdin, or run it in a terminal")
    model_dir = resolve(options.model)
    adapters, active = plan(model_dir, options.adapter, options.adapter_name, options.no_adapter)
    chat = Chat(Session(model_dir, adapters, active), sampling, template, options.stats)
    if options.prompt is not None:
        chat.one_shot(options.prompt)
    elif sys.stdin.isatty():
        chat.repl()
    else:
        chat.stdin_lines()


def resolve(spec: str, command: str = "infer") -> Path:
    """`-m D` (an auto-opt output), `-m D/model`, or any directory with genai_config.json;
    a refusal names `command` (infer or serve) and the auto-opt step that makes such a dir."""
    from phitune.artifacts.resolve import resolve_model
    return resolve_model(spec, ("onnx-genai",), command).path
