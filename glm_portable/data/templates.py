"""Prompt templates per model family: token ids and labels exactly as THUDM's training code builds them.

- chatglm2: ``[gMASK] sop`` + the round prompt cut to max_source, the answer cut to max_target, eos;
  labels only on the answer and eos (THUDM ChatGLM2 ptuning/main.py).
- chatglm3: role tokens per message; labels on assistant messages and the token after each, the
  whole cut to max_source + max_target + 1 (THUDM ChatGLM3 finetune_demo); evaluation rows per
  assistant turn.
- chatglm (ChatGLM-6B): prompt + ``[gMASK] sop`` + answer + ``eop``; labels from ``sop`` on.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Sequence

from glm_portable.errors import UserError
from glm_portable.modeling.model import IGNORE_INDEX
from glm_portable.modeling.prompts import chatglm1_prompt, chatglm2_prompt
from glm_portable.modeling.tokenizer import ROLES

from .formats import Example


@dataclass
class Encoded:
    """Unpadded rows plus what was cut; ``labels`` is empty for evaluation rows, the references for training rows.

    ``references`` are what THUDM scores against: the answer tokenized with max_target_length (the
    special tokens counted) and decoded back; ``full_references`` are the answers as written.
    """

    input_ids: list[list[int]] = field(default_factory=list)
    labels: list[list[int]] = field(default_factory=list)
    references: list[str] = field(default_factory=list)
    full_references: list[str] = field(default_factory=list)
    source_truncated: int = 0
    target_truncated: int = 0


def cut_references(tokenizer, answers: Sequence[str], max_target: int, num_threads: int = 1) -> list[str]:
    """THUDM's evaluation labels for ChatGLM2 and ChatGLM-6B: the answer encoded with max_target_length and
    truncation, where the two special tokens its tokenizer adds count toward the length, then decoded."""
    return [tokenizer.decode(ids[: max(max_target - 2, 0)]) for ids in tokenizer.encode_batch(answers, num_threads)]


def split_turn(messages: Sequence[dict]) -> tuple[str, list[dict], str, str]:
    """(system text, history, query, answer) of a conversation ending with user, assistant."""
    *earlier, last_user, answer = messages
    if not earlier:
        return "", [], last_user["content"] if last_user["role"] == "user" else "", answer["content"]
    system = "".join(m["content"] for m in earlier if m["role"] == "system")
    history = [m for m in earlier if m["role"] != "system"]
    query = last_user["content"] if last_user["role"] == "user" else ""
    return system, history, query, answer["content"]


class Template(ABC):
    name: str
    family: str

    def fixed_length(self, max_source: int, max_target: int) -> int:
        """Padded length for static shapes: source + target + eos."""
        return max_source + max_target + 1

    @abstractmethod
    def encode_train(self, tokenizer, examples: Sequence[Example], max_source: int, max_target: int,
                     source_prefix: str = "", num_threads: int = 1) -> Encoded: ...

    @abstractmethod
    def encode_eval(self, tokenizer, examples: Sequence[Example], max_source: int, max_target: int,
                    source_prefix: str = "", num_threads: int = 1) -> Encoded: ...


class ChatGLM2Rounds(Template):
    name, family = "chatglm2-rounds", "chatglm2"

    def _prompts(self, tokenizer, examples, max_source, source_prefix, num_threads):
        turns = [split_turn(e.messages) for e in examples]
        prompts = [source_prefix + system + chatglm2_prompt(query, history) for system, history, query, _ in turns]
        prefix = tokenizer.prefix_ids
        limit = max_source - len(prefix)
        sources = tokenizer.encode_batch(prompts, num_threads)
        return turns, [prefix + ids[:limit] for ids in sources], sum(len(ids) > limit for ids in sources)

    def encode_train(self, tokenizer, examples, max_source, max_target, source_prefix="", num_threads=1):
        turns, sources, cut = self._prompts(tokenizer, examples, max_source, source_prefix, num_threads)
        answers = tokenizer.encode_batch([answer for *_, answer in turns], num_threads)
        out = Encoded(source_truncated=cut, target_truncated=sum(len(b) > max_target for b in answers))
        eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        for a, b in zip(sources, answers):
            b = b[:max_target]
            out.input_ids.append(a + b + [eos])
            if pad in b:
                b_labels = [t if t != pad else IGNORE_INDEX for t in b]
            else:
                b_labels = b
            out.labels.append([IGNORE_INDEX] * len(a) + b_labels + [eos])
        return out

    def encode_eval(self, tokenizer, examples, max_source, max_target, source_prefix="", num_threads=1):
        turns, sources, cut = self._prompts(tokenizer, examples, max_source, source_prefix, num_threads)
        answers = [answer for *_, answer in turns]
        return Encoded(input_ids=sources, references=cut_references(tokenizer, answers, max_target, num_threads),
                       full_references=answers, source_truncated=cut)


class ChatGLM3Roles(Template):
    name, family = "chatglm3-roles", "chatglm3"

    def _messages(self, examples, source_prefix):
        for example in examples:
            messages = list(example.messages)
            if source_prefix:
                messages.insert(0, {"role": "system", "content": source_prefix})
            yield messages

    def _encode_messages(self, tokenizer, conversations, num_threads):
        """Per conversation, per message: (role, ids of role token + metadata line + content)."""
        newline = tokenizer.encode_text("\n")
        role_ids = {role: [tokenizer.get_command(f"<|{role}|>")] + newline for role in ROLES}
        flat = tokenizer.encode_batch([m["content"] for conv in conversations for m in conv], num_threads)
        out, i = [], 0
        for conv in conversations:
            encoded = []
            for message in conv:
                encoded.append((message["role"], role_ids[message["role"]] + flat[i]))
                i += 1
            out.append(encoded)
        return out

    def encode_train(self, tokenizer, examples, max_source, max_target, source_prefix="", num_threads=1):
        conversations = list(self._messages(examples, source_prefix))
        limit = max_source + max_target + 1
        prefix, eos = tokenizer.prefix_ids, tokenizer.eos_token_id
        out = Encoded()
        for encoded in self._encode_messages(tokenizer, conversations, num_threads):
            ids, trained = list(prefix), [False, False]
            for role, message_ids in encoded:
                ids += message_ids
                trained += [role == "assistant"] * len(message_ids)
            ids.append(eos)
            trained = [False] + trained
            labels = [t if keep else IGNORE_INDEX for t, keep in zip(ids, trained)]
            if len(ids) > limit:
                prompt_len = len(ids) - len(encoded[-1][1]) - 1
                if prompt_len > limit:
                    out.source_truncated += 1
                else:
                    out.target_truncated += 1
            out.input_ids.append(ids[:limit])
            out.labels.append(labels[:limit])
        return out

    def encode_eval(self, tokenizer, examples, max_source, max_target, source_prefix="", num_threads=1):
        """One row per assistant turn, as ChatGLM3's finetune_demo evaluates: the conversation before it, cut to
        max_source, then ``<|assistant|>``; the reference is the turn's metadata line, content and eos cut to
        max_target, decoded. Turns reached only after the prompt has filled max_source are dropped (counted)."""
        conversations = list(self._messages(examples, source_prefix))
        assistant, eos = tokenizer.get_command("<|assistant|>"), tokenizer.eos_token_id
        out = Encoded()
        for conversation, encoded in zip(conversations, self._encode_messages(tokenizer, conversations, num_threads)):
            ids = list(tokenizer.prefix_ids)
            for message, (role, message_ids) in zip(conversation, encoded):
                if len(ids) >= max_source:
                    out.source_truncated += 1
                    break
                if role == "assistant":
                    answer = (message_ids[1:] + [eos])[:max_target]
                    out.input_ids.append(ids[:max_source] + [assistant])
                    out.references.append(tokenizer.decode(answer).strip())
                    out.full_references.append(message["content"])
                    out.target_truncated += len(message_ids) > max_target
                ids += message_ids
        return out


class ChatGLM1(Template):
    """ChatGLM-6B (THUDM's v1 ptuning/main.py): the prompt cut to max_source−1, the answer to max_target−2."""

    name, family = "chatglm-v1", "chatglm"

    def fixed_length(self, max_source: int, max_target: int) -> int:
        return max_source + max_target

    def _sources(self, tokenizer, examples, max_source, source_prefix, num_threads, reserve):
        turns = [split_turn(e.messages) for e in examples]
        texts = [source_prefix + system + chatglm1_prompt(query, history, e.history_given)
                 for e, (system, history, query, _) in zip(examples, turns)]
        sources = tokenizer.encode_batch(texts, num_threads)
        return turns, [s[: max_source - reserve] for s in sources], sum(len(s) > max_source - reserve for s in sources)

    def encode_train(self, tokenizer, examples, max_source, max_target, source_prefix="", num_threads=1):
        turns, sources, cut = self._sources(tokenizer, examples, max_source, source_prefix, num_threads, 1)
        answers = tokenizer.encode_batch([answer for *_, answer in turns], num_threads)
        out = Encoded(source_truncated=cut, target_truncated=sum(len(b) > max_target - 2 for b in answers))
        gmask, sop, eop = (tokenizer.get_command(t) for t in ("[gMASK]", "sop", "eop"))
        for a, b in zip(sources, answers):
            ids = a + [gmask, sop] + b[: max_target - 2] + [eop]
            context = len(a) + 1
            out.input_ids.append(ids)
            out.labels.append([IGNORE_INDEX] * context + ids[context:])
        return out

    def encode_eval(self, tokenizer, examples, max_source, max_target, source_prefix="", num_threads=1):
        turns, sources, cut = self._sources(tokenizer, examples, max_source, source_prefix, num_threads, 2)
        gmask, sop = tokenizer.get_command("[gMASK]"), tokenizer.get_command("sop")
        answers = [a for *_, a in turns]
        return Encoded(input_ids=[s + [gmask, sop] for s in sources],
                       references=cut_references(tokenizer, answers, max_target, num_threads), full_references=answers,
                       source_truncated=cut)


TEMPLATES: dict[str, Template] = {t.family: t for t in (ChatGLM2Rounds(), ChatGLM3Roles(), ChatGLM1())}


def template_for(tokenizer) -> Template:
    """The template of the tokenizer's model family."""
    if tokenizer.family not in TEMPLATES:
        raise UserError(f"no prompt template for model family {tokenizer.family!r}")
    return TEMPLATES[tokenizer.family]
