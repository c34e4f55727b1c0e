"""Chat templates for lm-eval on ``model="jaxarith"``: one model, or one template per member.

lm-eval applies a chat template inside its task code: with ``apply_chat_template`` it builds each
prompt as messages (system instruction, few-shot turns, the question) and asks the model's
``apply_chat_template(chat_history, add_generation_prompt)`` for the text. The ``hf`` backend
answers with ``tokenizer.apply_chat_template(..., tokenize=False, add_generation_prompt=...,
continue_final_message=not add_generation_prompt)``, retrying without the system message when
the template refuses one; :func:`render` makes the identical call, so one model's prompts equal
the ``hf`` backend's.

A logit combination may give every member its own template (:class:`MemberTemplates`): a
choice per member role (``base``, ``expert``, ``anti_expert`` for proxy tuning; ``model``,
``tuned``, ``reference`` for EFT), each

- ``auto``: the member's own tokenizer's template (its ``"default"`` one if it has several),
- a name: that template of the member's tokenizer (``tokenizer.chat_template`` a dict), or
- ``none``: no template: the conversation as lm-eval's plain prompt (:func:`plain`).

Every member's rendering of a conversation is kept under the text lm-eval receives (the first
templated member's, in member order), so a request's context can be looked up per member when it
arrives (:meth:`MemberTemplates.contexts`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from lm_eval.api.utils import requires_delimiter

from jaxarith.errors import ConfigError

log = logging.getLogger(__name__)

AUTO = "auto"
NONE = "none"
_TRUE = ("auto", "true", "1", "yes", "default")
_FALSE = ("none", "false", "0", "no", "plain")
_CONFLICT = object()  # one lm-eval context rendered from conversations that members see apart


def parse_choice(value: Any, where: str) -> str:
    """``auto``, ``none`` or a template name, from a bool or a string."""
    if value is True or value is None:
        return AUTO
    if value is False:
        return NONE
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}={value!r}: expected auto, none or a template name")
    v = value.strip()
    return AUTO if v.lower() in _TRUE else NONE if v.lower() in _FALSE else v


def parse_member_templates(value: Mapping[str, Any] | str | None, roles: Sequence[str],
                           default: str = AUTO) -> dict[str, str]:
    """``{role: choice}`` for every member from ``value``: a mapping, or ``role=choice`` pairs
    joined by ``+`` or spaces (``expert=auto+base=none``); unlisted roles get ``default``.

    Raises:
      ConfigError: a role that no member has (naming the members), or a malformed pair.
    """
    given: dict[str, Any] = {}
    if isinstance(value, str):
        for part in value.replace("+", " ").split():
            role, sep, choice = part.partition("=")
            if not sep or not role:
                raise ConfigError(f"member_templates {part!r}: expected ROLE=auto|none|NAME")
            given[role.strip()] = choice
    elif value is not None:
        given = dict(value)
    unknown = [r for r in given if r not in roles]
    if unknown:
        raise ConfigError(f"member_templates: no member {', '.join(map(repr, unknown))}; the "
                          f"members are {', '.join(roles)}")
    return {r: parse_choice(given.get(r, default), f"member_templates {r}") for r in roles}


def template_text(tokenizer, choice: str, role: str) -> str | None:
    """The Jinja text of ``choice`` for a member's tokenizer (None for ``none``).

    Raises:
      ConfigError: the tokenizer has no template (``auto``), or no template of that name.
    """
    if choice == NONE:
        return None
    t = getattr(tokenizer, "chat_template", None)
    if isinstance(t, dict):
        if choice == AUTO:
            if "default" not in t:
                raise ConfigError(f"member {role}: its tokenizer has several chat templates "
                                  f"({', '.join(sorted(t))}) and none named 'default': name one")
            return t["default"]
        if choice not in t:
            raise ConfigError(f"member {role}: its tokenizer has no chat template {choice!r} "
                              f"(it has {', '.join(sorted(t))})")
        return t[choice]
    if not t:
        raise ConfigError(f"member {role}: its tokenizer has no chat template; give it one "
                          f"(tokenizer_config.json / chat_template.jinja) or render it without "
                          f"(member_templates {role}=none, --member-chat-template {role}=none)")
    if choice != AUTO:
        raise ConfigError(f"member {role}: chat template {choice!r} asked for, but its "
                          f"tokenizer has a single unnamed template (use auto)")
    return t


def render(tokenizer, template: str | None, chat_history: list[dict],
           add_generation_prompt: bool = True) -> str:
    """lm-eval's ``hf`` backend's ``apply_chat_template``, with ``template`` (None: plain)."""
    if template is None:
        return plain(chat_history)
    import jinja2

    kw = dict(tokenize=False, add_generation_prompt=add_generation_prompt,
              continue_final_message=not add_generation_prompt, chat_template=template)
    try:
        return tokenizer.apply_chat_template(chat_history, **kw)
    except jinja2.exceptions.TemplateError:
        log.warning("Failed to apply chat template. removing the system role in chat history.")
        return tokenizer.apply_chat_template(
            [m for m in chat_history if m["role"] != "system"], **kw)


def plain(chat_history: Sequence[Mapping[str, str]], target_delimiter: str = " ",
          fewshot_delimiter: str = "\n\n") -> str:
    """A conversation as lm-eval's plain prompt (its ``apply_chat_template=False`` text).

    lm-eval joins a task's messages with its delimiters: the system message as is, a question
    and its answer with the target delimiter, an answer and the next question with the few-shot
    delimiter, a final assistant message (a generation prefix) after the question (with a space
    unless one side has whitespace). The chat history carries no delimiters, so the task
    defaults are used (``" "``, ``"\\n\\n"``); a single-turn history (lm-eval's
    ``fewshot_as_multiturn=False``) holds lm-eval's own joined text.
    """
    out = []
    msgs = list(chat_history)
    for i, m in enumerate(msgs):
        text = m["content"]
        nxt = msgs[i + 1] if i + 1 < len(msgs) else None
        if m["role"] == "user" and nxt is not None and nxt["role"] == "assistant":
            prefix = i + 1 == len(msgs) - 1  # a final assistant message: a generation prefix
            if not prefix or requires_delimiter(text, nxt["content"]):
                text += target_delimiter
        elif m["role"] == "assistant" and nxt is not None:
            text += fewshot_delimiter
        out.append(text)
    return "".join(out)


class MemberTemplates:
    """Per-member renderings of lm-eval's conversations (see the module docstring).

    Args:
      tokenizers: one per member (their templates; the ids come from the shared tokenizer).
      roles: the members' role names.
      choices: ``{role: auto | none | NAME}``.
    """

    def __init__(self, tokenizers: Sequence[Any], roles: Sequence[str],
                 choices: Mapping[str, str]):
        self.tokenizers, self.roles = list(tokenizers), list(roles)
        self.choices = dict(choices)
        self._texts: list[str | None] | None = None
        self._seen: dict[str, tuple[str, ...] | object] = {}

    @property
    def differ(self) -> bool:
        """Whether members may read different contexts (their choices are not all one)."""
        return len(set(self.choices.values())) > 1

    def texts(self) -> list[str | None]:
        """Each member's template text (resolved once, when first needed)."""
        if self._texts is None:
            self._texts = [template_text(tok, self.choices[r], r)
                           for tok, r in zip(self.tokenizers, self.roles, strict=True)]
        return self._texts

    @property
    def per_member(self) -> bool:
        """Whether members render conversations differently (then contexts are per member)."""
        return self.differ and len(set(self.texts())) > 1

    def primary(self) -> int:
        """The member whose rendering lm-eval receives: the first templated one."""
        return next((i for i, t in enumerate(self.texts()) if t is not None), 0)

    def apply(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        """The text lm-eval gets; every member's rendering is kept under it."""
        texts = self.texts()
        if not self.per_member:
            p = self.primary()
            return render(self.tokenizers[p], texts[p], chat_history, add_generation_prompt)
        out = tuple(render(tok, t, chat_history, add_generation_prompt)
                    for tok, t in zip(self.tokenizers, texts, strict=True))
        key = out[self.primary()]
        self._seen[key] = out if self._seen.get(key, out) == out else _CONFLICT
        return key

    def contexts(self, context: str) -> tuple[str, ...]:
        """Each member's context for a request whose context lm-eval gives as ``context``.

        Raises:
          ConfigError: the members render differently but ``context`` came from no chat
            template (lm-eval ran without ``apply_chat_template``), or two conversations that
            the members see apart gave lm-eval one text.
        """
        n = len(self.roles)
        if not self.per_member or context == "":
            return (context,) * n
        got = self._seen.get(context)
        if got is _CONFLICT:
            raise ConfigError("two different conversations render to one context under "
                              f"member {self.roles[self.primary()]}'s template but differ for "
                              "other members: their contexts are ambiguous")
        if got is None:
            raise ConfigError(
                "member templates differ (" + ", ".join(f"{r}={c}" for r, c in
                                                       self.choices.items())
                + ") but lm-eval passed a context that no chat template rendered: run lm-eval "
                  "with apply_chat_template=True (--apply-chat-template)")
        return got  # type: ignore[return-value]

    def aligned(self, key, ctx: list[int], cont: list[int], encode_pair, decode
                ) -> tuple[tuple[list[int], ...], list[int]]:
        """Each member's context ids for a request and the continuation ids all of them score.

        Args:
          key: lm-eval's (context, continuation) strings (None for a rolling window: every
            member reads ``ctx``).
          ctx, cont: the ids of lm-eval's context (the primary member's) and continuation.
          encode_pair: the model's ``_encode_pair(context, continuation)`` (the ``hf``
            backend's tokenisation); decode: ids -> text.

        Each member's pair is tokenised as the ``hf`` backend does, which moves whitespace
        ending a context into the continuation: a chat template's generation prompt
        (``...assistant\\n``) then adds tokens in front of that member's continuation. Such
        leading whitespace tokens stay in that member's context; the ids scored are the tokens
        the members' continuations end with in common (with one template: the ``hf``
        backend's).

        Raises:
          ConfigError: the members' continuation ids do not end alike, or a member's extra
            leading tokens are more than whitespace (naming the member and both tokenisations):
            their log-probabilities cannot be combined token by token.
        """
        n_members = len(self.roles)
        if key is None:
            return (ctx,) * n_members, cont
        context, continuation = key
        texts = self.contexts(context)
        enc = [(list(ctx), list(cont)) if t == context else
               tuple(map(list, encode_pair(t, continuation))) for t in texts]
        n = min(len(x) for _, x in enc)
        short = min(range(n_members), key=lambda i: len(enc[i][1]))
        common = enc[short][1]
        for role, (_, x) in zip(self.roles, enc, strict=True):
            # a member's extra leading tokens may only be the whitespace its context ended with
            if not n or x[len(x) - n:] != common or decode(x[:len(x) - n]).strip():
                raise ConfigError(
                    f"member {role}: the continuation {continuation!r} tokenises as {x} after "
                    f"its own context but as {common} after member {self.roles[short]}'s: the "
                    f"members' log-probabilities cannot be combined token by token (give the "
                    f"members templates whose prompts end alike, or one template)")
        return tuple(c + x[:len(x) - n] for c, x in enc), common

    def describe(self) -> dict[str, str]:
        return dict(self.choices)
