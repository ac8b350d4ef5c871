"""The binding rule, for "<NP1> and <NP2>[ trailing context]": sets that test what composition
errors are — which object is there, and which colour goes with which object.

For "a red circle and a blue square on a grass background" the set is, in this order:

1. each object alone ("a red circle on a grass background", "a blue square on ...");
2. one object replaced by another kind of the vocabulary not already in the prompt
   ("a red star and a blue square ...", "a red circle and a blue star ...");
3. one object's count changed by ±1 and ±2, never below one ("two red circles and ...");
4. the colours swapped between the objects ("a blue circle and a red square ...");
5. one object's colour changed to every other colour of the vocabulary.

Kinds 2, 4 and 5 need vocabulary words (shapes / colours, the shapes world's by default);
kinds 1 and 3 work on any "<NP1> and <NP2>" prompt ("an apple and a dog"). Articles follow the
new first word ("a red circle" → "an orange circle"), singular/plural and the number style
are kept, and text before the first phrase and after the second is kept as it is.

The paper's composition templates (each object alone, count combinations, "an X-like Y") stay
available as the "composition" rule (``service.contrastive.composition``).
"""

from __future__ import annotations

from service.contrastive.composition import find_composition
from service.contrastive.inflection import article
from service.contrastive.phrases import CountPhrase, render_phrase
from service.contrastive.tokens import Token, match_case, tokenize
from service.contrastive.vocabulary import Vocabulary, resolve

BINDING_COUNT_STEPS: tuple[int, ...] = (-2, -1, 1, 2)


def binding_candidates(prompt: str, *, vocabulary: Vocabulary | None = None) -> list[str]:
    """Binding prompts, before dedupe; empty when the prompt is not "<NP1> and <NP2>"."""
    found = find_composition(prompt, tokenize(prompt))
    if found is None:
        return []
    words = resolve(vocabulary)
    first, second = found
    before, after = prompt[: first.start], prompt[second.end :]
    separator = prompt[first.end : second.start]
    case = first.count_word.text
    colour_tokens = [_colour_token(p, words) for p in found]
    own = [prompt[first.start : first.end], prompt[second.start : second.end]]

    def pair(index: int, rewritten: str) -> str:
        """The prompt with phrase `index` replaced by `rewritten`."""
        phrases = [rewritten, own[1]] if index == 0 else [own[0], rewritten]
        return before + phrases[0] + separator + phrases[1] + after

    outputs = [
        before + own[0] + after,
        before + render_phrase(prompt, second, second.count, case_template=case) + after,
    ]
    taken = {words.shape_of(p.head.lower) for p in found}
    for index, phrase in enumerate(found):
        own_shape = words.shape_of(phrase.head.lower)
        if own_shape is None:
            continue
        plural = phrase.head.lower != own_shape
        for shape, shape_plural in words.shapes.items():
            if shape not in taken:
                new = shape_plural if plural else shape
                outputs.append(pair(index, _rewrite(prompt, phrase, shape=new)))
    for index, phrase in enumerate(found):
        for step in BINDING_COUNT_STEPS:
            if phrase.count + step >= 1:
                outputs.append(pair(index, render_phrase(prompt, phrase, phrase.count + step)))
    if None not in colour_tokens and colour_tokens[0].lower != colour_tokens[1].lower:
        one = _rewrite(prompt, first, colour_tokens[0], colour_tokens[1].lower)
        two = _rewrite(prompt, second, colour_tokens[1], colour_tokens[0].lower)
        outputs.append(before + one + separator + two + after)
    for index, phrase in enumerate(found):
        token = colour_tokens[index]
        if token is not None:
            for colour in words.colours:
                if colour != token.lower:
                    outputs.append(pair(index, _rewrite(prompt, phrase, token, colour)))
    return outputs


def _colour_token(phrase: CountPhrase, words: Vocabulary) -> Token | None:
    """The phrase's one colour adjective (a vocabulary colour before the head noun), if any."""
    found = [w for w in phrase.words[:-1] if w.lower in words.colours]
    return found[0] if len(found) == 1 else None


def _rewrite(
    text: str,
    phrase: CountPhrase,
    colour_token: Token | None = None,
    colour: str | None = None,
    *,
    shape: str | None = None,
) -> str:
    """The phrase's text with `colour_token` replaced by `colour` and/or its head noun by
    `shape` (a word in the head's number); an "a"/"an" count word fits the new first word."""
    pieces: list[str] = []
    previous_end = phrase.count_word.end
    for token in phrase.words:
        word = token.text
        if token is phrase.head and shape is not None:
            word = match_case(shape, token.text)
        elif token is colour_token and colour is not None:
            word = match_case(colour, token.text)
        pieces.append(text[previous_end : token.start] + word)
        previous_end = token.end
    body = "".join(pieces)
    count_word = phrase.count_word.text
    if not phrase.digits and count_word.lower() in ("a", "an"):
        count_word = match_case(article(body.lstrip()), count_word)
    return count_word + body
