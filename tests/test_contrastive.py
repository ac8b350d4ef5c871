"""Contrastive prompt generation for TextNorm (DESIGN.md section 2.3)."""

import json
import random

import pytest

from service.contrastive import (
    CONTRASTIVE_RULES,
    DEFAULT_VOCABULARY_FILE,
    NoContrastivePrompts,
    PromptSetFormatError,
    Vocabulary,
    attribute_swaps,
    clean_contrastive_set,
    contrastive_prompts,
    default_vocabulary,
    load_prompt_sets,
    load_vocabulary,
    parse_prompt_sets,
    parse_vocabulary,
    pluralize,
    singularize,
)
from service.contrastive.phrases import MAX_READ_COUNT
from service.contrastive.phrases import NUMBER_WORDS as ENGLISH_NUMBER_WORDS
from shapes_world.vocab import BACKGROUNDS, COLOURS, SHAPES
from shapes_world.vocab import NUMBER_WORDS as SHAPES_NUMBER_WORDS

# --------------------------------------------------------------------------------------------
# Counting
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("an airplane", ["two airplanes", "three airplanes"]),
        ("six cats", ["four cats", "five cats", "seven cats", "eight cats"]),
        (
            "a realistic photo of six cats",
            [
                "a realistic photo of four cats",
                "a realistic photo of five cats",
                "a realistic photo of seven cats",
                "a realistic photo of eight cats",
            ],
        ),
        ("3 cats", ["1 cat", "2 cats", "4 cats", "5 cats"]),
        ("two oranges", ["an orange", "three oranges", "four oranges"]),
        ("two red apples", ["a red apple", "three red apples", "four red apples"]),
        (
            "three blue triangles on a grass background",
            [
                "a blue triangle on a grass background",
                "two blue triangles on a grass background",
                "four blue triangles on a grass background",
                "five blue triangles on a grass background",
            ],
        ),
    ],
)
def test_counting_design_examples(prompt: str, expected: list[str]) -> None:
    assert contrastive_prompts(prompt, "counting") == expected


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a cat", ["two cats", "three cats"]),
        ("an egg", ["two eggs", "three eggs"]),
        ("one dog", ["two dogs", "three dogs"]),
        ("1 dog", ["2 dogs", "3 dogs"]),
        ("2 dogs", ["1 dog", "3 dogs", "4 dogs"]),
        ("4 dogs", ["2 dogs", "3 dogs", "5 dogs", "6 dogs"]),
        ("5 dogs", ["3 dogs", "4 dogs", "6 dogs", "7 dogs"]),
        ("6 dogs", ["4 dogs", "5 dogs", "7 dogs", "8 dogs"]),
        ("two eggs", ["an egg", "three eggs", "four eggs"]),
        ("two umbrellas", ["an umbrella", "three umbrellas", "four umbrellas"]),
        ("two unicorns", ["a unicorn", "three unicorns", "four unicorns"]),
        ("two old owls", ["an old owl", "three old owls", "four old owls"]),
        ("two big owls", ["a big owl", "three big owls", "four big owls"]),
        ("twelve eggs", ["ten eggs", "eleven eggs", "thirteen eggs", "fourteen eggs"]),
        # after a determiner a count of 1 is "one" ("the a cat" before)
        ("the two cats", ["the one cat", "the three cats", "the four cats"]),
        (
            "my two eggs on a plate",
            ["my one egg on a plate", "my three eggs on a plate", "my four eggs on a plate"],
        ),  # fmt: skip
        ("The Two Cats", ["The One Cat", "The Three Cats", "The Four Cats"]),
        ("two 18-wheelers", ["an 18-wheeler", "three 18-wheelers", "four 18-wheelers"]),
    ],
)
def test_counting_articles_digits_and_words(prompt: str, expected: list[str]) -> None:
    assert contrastive_prompts(prompt, "counting") == expected


@pytest.mark.parametrize(
    ("singular", "plural"),
    [
        ("cat", "cats"),
        ("airplane", "airplanes"),
        ("cross", "crosses"),
        ("box", "boxes"),
        ("bus", "buses"),
        ("glass", "glasses"),
        ("church", "churches"),
        ("dish", "dishes"),
        ("quiz", "quizzes"),
        ("buzz", "buzzes"),
        ("baby", "babies"),
        ("toy", "toys"),
        ("cookie", "cookies"),
        ("knife", "knives"),
        ("leaf", "leaves"),
        ("wolf", "wolves"),
        ("shelf", "shelves"),
        ("roof", "roofs"),
        ("person", "people"),
        ("child", "children"),
        ("man", "men"),
        ("woman", "women"),
        ("snowman", "snowmen"),
        ("human", "humans"),
        ("mouse", "mice"),
        ("foot", "feet"),
        ("tooth", "teeth"),
        ("goose", "geese"),
        ("sheep", "sheep"),
        ("fish", "fish"),
        ("deer", "deer"),
        ("tomato", "tomatoes"),
        ("photo", "photos"),
        ("house", "houses"),
        ("prize", "prizes"),
        ("headache", "headaches"),
        ("taxi", "taxis"),
        ("teddy-bear", "teddy-bears"),
    ],
)
def test_pluralize_and_singularize_are_inverse(singular: str, plural: str) -> None:
    assert pluralize(singular) == plural
    assert singularize(plural) == singular


def test_inflection_keeps_case_style() -> None:
    assert pluralize("Knife") == "Knives"
    assert pluralize("BOX") == "BOXES"
    assert singularize("People") == "Person"


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a cross", ["two crosses", "three crosses"]),
        ("two boxes", ["a box", "three boxes", "four boxes"]),
        ("a knife", ["two knives", "three knives"]),
        ("three leaves", ["a leaf", "two leaves", "four leaves", "five leaves"]),
        ("a wolf", ["two wolves", "three wolves"]),
        ("two people", ["a person", "three people", "four people"]),
        ("a child", ["two children", "three children"]),
        ("two women", ["a woman", "three women", "four women"]),
        ("a mouse", ["two mice", "three mice"]),
        ("two geese", ["a goose", "three geese", "four geese"]),
        ("a sheep", ["two sheep", "three sheep"]),
        ("2 fish", ["1 fish", "3 fish", "4 fish"]),
        ("a puppy", ["two puppies", "three puppies"]),
    ],
)
def test_counting_gets_plurals_right(prompt: str, expected: list[str]) -> None:
    assert contrastive_prompts(prompt, "counting") == expected


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        # Container: the count applies to "a cat", not "a photo".
        ("a photo of a cat", ["a photo of two cats", "a photo of three cats"]),
        # Location: count the circle, not the background.
        (
            "a red circle on a white background",
            ["two red circles on a white background", "three red circles on a white background"],
        ),
        # An explicit number wins over an earlier article phrase.
        (
            "a dog with 2 balls",
            ["a dog with 1 ball", "a dog with 3 balls", "a dog with 4 balls"],
        ),
        # Trailing context, capitalisation and punctuation are kept.
        (
            "A Cat sitting on a mat, at night.",
            ["Two Cats sitting on a mat, at night.", "Three Cats sitting on a mat, at night."],
        ),
        (
            "Three dogs playing in the snow",
            [
                "A dog playing in the snow",
                "Two dogs playing in the snow",
                "Four dogs playing in the snow",
                "Five dogs playing in the snow",
            ],
        ),
        ("TWO CATS", ["A CAT", "THREE CATS", "FOUR CATS"]),
        (
            "an oil painting of two sleeping cats",
            [
                "an oil painting of a sleeping cat",
                "an oil painting of three sleeping cats",
                "an oil painting of four sleeping cats",
            ],
        ),
    ],
)
def test_counting_free_form_prompts(prompt: str, expected: list[str]) -> None:
    assert contrastive_prompts(prompt, "counting") == expected


@pytest.mark.parametrize(
    "prompt",
    ["", "cats", "the cat", "a few cats", "3.5 cats", "a photo of cats", "on a table", "!!!"],
)
def test_counting_without_a_count_phrase_raises(prompt: str) -> None:
    with pytest.raises(NoContrastivePrompts, match="no count phrase"):
        contrastive_prompts(prompt, "counting")


# --------------------------------------------------------------------------------------------
# Composition
# --------------------------------------------------------------------------------------------


def test_composition_design_example_exactly() -> None:
    assert contrastive_prompts("an apple and a dog", "composition") == [
        "an apple",
        "a dog",
        "an apple and two dogs",
        "an apple and three dogs",
        "two apples and a dog",
        "two apples and two dogs",
        "two apples and three dogs",
        "three apples and a dog",
        "three apples and two dogs",
        "three apples and three dogs",
        "an apple-like dog",
        "a dog-like apple",
    ]


def test_composition_with_adjectives_and_trailing_context() -> None:
    prompts = contrastive_prompts(
        "a red circle and a blue square on a white background", "composition"
    )
    assert len(prompts) == 12
    assert prompts[:2] == [
        "a red circle on a white background",
        "a blue square on a white background",
    ]
    assert "two red circles and three blue squares on a white background" in prompts
    assert prompts[-2:] == [
        "a red circle-like blue square on a white background",
        "a blue square-like red circle on a white background",
    ]


def test_composition_keeps_counts_styles_and_excludes_the_original() -> None:
    prompt = "two apples and an orange"
    prompts = contrastive_prompts(prompt, "composition")
    assert prompts[:3] == ["two apples", "an orange", "an apple and an orange"]
    assert prompt not in prompts
    assert "an apple-like orange" in prompts
    assert "an orange-like apple" in prompts
    assert len(prompts) == 12  # 2 alone + 8 count pairs + 2 blends


def test_composition_with_leading_context_and_capital() -> None:
    prompts = contrastive_prompts("A photo of 2 cats and a dog", "composition")
    assert prompts[:3] == ["A photo of 2 cats", "A photo of a dog", "A photo of 1 cat and a dog"]
    assert prompts[-2:] == ["A photo of a cat-like dog", "A photo of a dog-like cat"]


@pytest.mark.parametrize("prompt", ["an apple", "apples and dogs", "a cat and the dog", ""])
def test_composition_not_applicable_raises(prompt: str) -> None:
    with pytest.raises(NoContrastivePrompts, match="composition"):
        contrastive_prompts(prompt, "composition")


# --------------------------------------------------------------------------------------------
# Attribute swaps (shapes world)
# --------------------------------------------------------------------------------------------


def test_attribute_swaps_single_group() -> None:
    prompt = "three blue triangles on a grass background"
    prompts = contrastive_prompts(prompt, "attributes")
    n_colours, n_shapes, n_backgrounds = len(COLOURS) - 1, len(SHAPES) - 1, len(BACKGROUNDS) - 1
    assert len(prompts) == n_colours + n_shapes + n_backgrounds
    assert prompts[0] == "three red triangles on a grass background"
    assert prompts[n_colours : n_colours + n_shapes] == [
        "three blue circles on a grass background",
        "three blue squares on a grass background",
        "three blue stars on a grass background",
        "three blue crosses on a grass background",
    ]
    assert prompts[-n_backgrounds:] == [
        "three blue triangles on a white background",
        "three blue triangles on a sand background",
        "three blue triangles on a sky background",
        "three blue triangles on a brick background",
    ]


def test_attribute_swaps_fix_articles() -> None:
    assert attribute_swaps("a red circle", ("colour",))[0] == "an orange circle"
    colours = attribute_swaps("an orange star on a sky background", ("colour",))
    assert colours == [f"a {c} star on a sky background" for c in COLOURS if c != "orange"]
    assert attribute_swaps("A circle", ("object",)) == [
        "A square",
        "A triangle",
        "A star",
        "A cross",
    ]


def test_attribute_swaps_restricted_to_one_kind() -> None:
    prompt = "an orange star on a sky background"
    assert attribute_swaps(prompt, ("background",)) == [
        f"an orange star on a {b} background" for b in BACKGROUNDS if b != "sky"
    ]
    assert attribute_swaps(prompt, ("shape",)) == attribute_swaps(prompt, ("object",))
    assert len(attribute_swaps(prompt, ("object",))) == len(SHAPES) - 1


def test_attribute_swaps_two_groups() -> None:
    prompt = "two red circles and a blue square on a sand background"
    prompts = attribute_swaps(prompt)
    # 6 + 6 colours, 3 + 3 shapes (never the other group's shape), 4 backgrounds.
    assert len(prompts) == 22
    assert "two red circles and an orange square on a sand background" in prompts
    assert "two red crosses and a blue square on a sand background" in prompts
    assert "two red circles and a blue cross on a sand background" in prompts
    assert "two red squares and a blue square on a sand background" not in prompts
    assert "two red circles and a blue circle on a sand background" not in prompts


def test_colour_word_as_noun_is_not_swapped() -> None:
    with pytest.raises(NoContrastivePrompts, match="colour"):
        attribute_swaps("an orange on a table", ("colour",))


def test_attribute_swaps_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown attribute 'size'"):
        attribute_swaps("a red circle", ("size",))


@pytest.mark.parametrize("prompt", ["a cat on a mat", "", "a photo"])
def test_attributes_not_applicable_raises(prompt: str) -> None:
    with pytest.raises(NoContrastivePrompts, match="no colour or shape"):
        contrastive_prompts(prompt, "attributes")


# --------------------------------------------------------------------------------------------
# Auto, rule validation, invariants
# --------------------------------------------------------------------------------------------


def test_auto_prefers_binding_for_compositions() -> None:
    for prompt in ("an apple and a dog", "a red circle and a blue square on a sky background"):
        assert contrastive_prompts(prompt) == contrastive_prompts(prompt, "binding")
        assert contrastive_prompts(prompt) != contrastive_prompts(prompt, "composition")


def test_auto_is_counting_then_attributes() -> None:
    prompt = "three blue triangles on a grass background"
    expected = contrastive_prompts(prompt, "counting") + contrastive_prompts(prompt, "attributes")
    assert contrastive_prompts(prompt, "auto") == expected
    assert len(expected) == 4 + 14


def test_auto_counting_only_for_free_form() -> None:
    assert contrastive_prompts("a photo of six cats") == contrastive_prompts(
        "a photo of six cats", "counting"
    )


def test_auto_attributes_only() -> None:
    prompts = contrastive_prompts("blue stars on a sky background")
    assert prompts[0] == "red stars on a sky background"
    assert "blue crosses on a sky background" in prompts


@pytest.mark.parametrize(
    "prompt", ["", "   ", "cats on the sofa", "the quick brown fox", "?!", "colourless ideas"]
)
def test_auto_with_no_rule_applicable_raises(prompt: str) -> None:
    with pytest.raises(NoContrastivePrompts, match="no contrastive prompts"):
        contrastive_prompts(prompt)


def test_unknown_rule_names_the_allowed_values() -> None:
    with pytest.raises(ValueError, match="counting, binding, composition, attributes") as info:
        contrastive_prompts("a cat", "shuffle")
    assert not isinstance(info.value, NoContrastivePrompts)
    assert "auto" in str(info.value)


def test_no_contrastive_prompts_is_a_value_error() -> None:
    assert issubclass(NoContrastivePrompts, ValueError)
    assert issubclass(PromptSetFormatError, ValueError)


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


@pytest.mark.parametrize(
    ("prompt", "rule"),
    [
        ("an apple and a dog", "auto"),
        ("an apple and a dog", "counting"),
        ("two red circles and a blue square on a sand background", "composition"),
        ("two red circles and a blue square on a sand background", "attributes"),
        ("A photo of THREE Cats", "counting"),
        ("an orange star on a sky background", "auto"),
        ("a  red   circle", "attributes"),
        ("a red circle and a red circle", "composition"),
        ("two red circles and a blue square on a sand background", "binding"),
        ("a red circle and a red circle", "binding"),
        ("An orange star and 2 crosses", "binding"),
        ("two circles and two circles", "attributes"),
    ],
)
def test_outputs_exclude_original_and_are_unique(prompt: str, rule: str) -> None:
    prompts = contrastive_prompts(prompt, rule)
    keys = [_norm(p) for p in prompts]
    assert prompts
    assert _norm(prompt) not in keys
    assert len(keys) == len(set(keys))
    assert contrastive_prompts(prompt, rule) == prompts  # deterministic


def test_repeated_objects_are_deduplicated() -> None:
    # "a red circle" alone appears twice and "two ... and a ..." mirrors "a ... and two ...".
    prompts = contrastive_prompts("a red circle and a red circle", "composition")
    assert prompts[0] == "a red circle"
    assert prompts.count("a red circle") == 1
    assert prompts[-1] == "a red circle-like red circle"
    assert len(prompts) == 10  # 1 alone + 8 count pairs + 1 blend


ODD_STRINGS = [
    "",
    " ",
    "\n\t",
    "a",
    "an",
    "one",
    "3",
    "a and a",
    "and and and",
    "a a a a a",
    "two",
    "12",
    "0 cats",
    "13 cats",
    "99 red balloons",
    "-1 cats",
    "3.14159 pies",
    "a, cat",
    "a-cat",
    "a cat's toy",
    "!!!???...",
    "😀 a 🐱 and a 🐶",
    "два кота",
    "ein Hund und eine Katze",
    "ｔｗｏ ｃａｔｓ",
    "İSTANBUL a İstanbul",
    "a\x00cat",
    "a red",
    "red blue green",
    "a red background",
    "on a white background",
    "an orange",
    "a " * 5000,
    "three cats " * 2000,
    "a " + "big " * 3000 + "dog",
    "a cat and " * 500,
]


@pytest.mark.parametrize("rule", ["auto", "counting", "binding", "composition", "attributes"])
@pytest.mark.parametrize("prompt", ODD_STRINGS, ids=range(len(ODD_STRINGS)))
def test_never_crashes_on_odd_strings(prompt: str, rule: str) -> None:
    try:
        prompts = contrastive_prompts(prompt, rule)
    except NoContrastivePrompts as error:
        assert str(error).startswith("no contrastive prompts")
        assert len(str(error)) < 300
        return
    assert prompts and all(isinstance(p, str) for p in prompts)
    assert " ".join(prompt.split()).casefold() not in {
        " ".join(p.split()).casefold() for p in prompts
    }


def test_never_crashes_on_random_strings() -> None:
    rng = random.Random(0)
    alphabet = ["a", "an", "one", "two", "3", "and", "red", "circle", "cross", "of", "on", ",", " "]
    alphabet += ["background", "sky", "people", "é", "-", ".", "\n", "A", "Six", "like"]
    for _ in range(500):
        prompt = "".join(rng.choice(alphabet) + rng.choice(["", " "]) for _ in range(12))
        for rule in ("auto", "counting", "binding", "composition", "attributes"):
            try:
                prompts = contrastive_prompts(prompt, rule)
            except NoContrastivePrompts:
                continue
            assert prompts


def test_non_string_prompt_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="prompt must be a string"):
        contrastive_prompts(None)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Caller-supplied sets
# --------------------------------------------------------------------------------------------


def test_clean_contrastive_set() -> None:
    cleaned = clean_contrastive_set(
        "a cat", ["  two cats ", "", "   ", "A  Cat", "a dog", "TWO CATS", "a dog"]
    )
    assert cleaned == ["two cats", "a dog"]


def test_unicode_equivalent_spellings_are_the_prompt() -> None:
    from service.contrastive.dedupe import normalise

    precomposed, decomposed = "a caf\u00e9 sign", "a cafe\u0301 sign"
    assert normalise(decomposed) == normalise(precomposed) == normalise("A  CAF\u00c9 Sign")
    assert clean_contrastive_set(precomposed, [decomposed, "a blue sign"]) == ["a blue sign"]
    assert clean_contrastive_set("a red sign", [precomposed, decomposed]) == [precomposed]
    with pytest.raises(NoContrastivePrompts):
        clean_contrastive_set(decomposed, ["A CAF\u00c9 SIGN"])


def test_clean_contrastive_set_nothing_left() -> None:
    with pytest.raises(NoContrastivePrompts, match="no contrastive prompts"):
        clean_contrastive_set("a cat", ["", " a cat ", "A CAT"])


def test_clean_contrastive_set_rejects_non_strings() -> None:
    with pytest.raises(TypeError, match="index 1"):
        clean_contrastive_set("a cat", ["a dog", 3])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="list of strings"):
        clean_contrastive_set("a cat", "a dog")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# JSON import
# --------------------------------------------------------------------------------------------


def test_parse_prompt_sets_cleans_each_set() -> None:
    sets = parse_prompt_sets(
        {
            "an airplane": ["two airplanes", "an airplane", " three airplanes ", ""],
            " a dog ": ["a cat"],
        }
    )
    assert sets == {"an airplane": ["two airplanes", "three airplanes"], "a dog": ["a cat"]}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (["a cat"], "expected a JSON object .* got array"),
        ("a cat", "got string"),
        ({}, "at least one prompt set"),
        ({"a cat": "two cats"}, r"prompt set 'a cat': expected an array .* got string"),
        ({"a cat": {"x": 1}}, "prompt set 'a cat': expected an array .* got object"),
        ({"a cat": ["two cats", 3]}, "prompt set 'a cat', index 1: expected a string, got number"),
        ({"a cat": [None]}, "index 0: expected a string, got null"),
        ({"a cat": []}, "prompt set 'a cat': expected at least one"),
        ({"a cat": ["A cat", " "]}, "prompt set 'a cat': expected at least one"),
        ({"  ": ["a dog"]}, "key at position 0: expected a non-empty prompt"),
        ({"a cat": ["a dog"], 5: ["a dog"]}, "key at position 1"),
        ({"a cat": ["a dog"], "A  Cat": ["a dog"]}, "duplicate"),
    ],
)
def test_parse_prompt_sets_errors(data: object, message: str) -> None:
    with pytest.raises(PromptSetFormatError, match=message):
        parse_prompt_sets(data)


def test_load_prompt_sets(tmp_path) -> None:
    path = tmp_path / "sets.json"
    path.write_text(
        json.dumps(
            {"an airplane": ["two airplanes", "three airplanes"], "six cats": ["five cats"]}
        ),
        encoding="utf-8",
    )
    assert load_prompt_sets(path) == {
        "an airplane": ["two airplanes", "three airplanes"],
        "six cats": ["five cats"],
    }
    assert load_prompt_sets(str(path)) == load_prompt_sets(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"a cat": ["two cats"', "invalid JSON at line 1"),
        ('{"a cat": ["two cats"], "a cat": ["a dog"]}', "duplicate key 'a cat'"),
        ('{"a cat": [1]}', "index 0: expected a string"),
        ("[]", "expected a JSON object"),
    ],
)
def test_load_prompt_sets_errors_name_the_file(tmp_path, content: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(PromptSetFormatError, match=message) as info:
        load_prompt_sets(path)
    assert str(path) in str(info.value)


def test_load_prompt_sets_rejects_non_utf8_and_missing(tmp_path) -> None:
    path = tmp_path / "latin1.json"
    path.write_bytes(b'{"caf\xe9": ["tea"]}')
    with pytest.raises(PromptSetFormatError, match="not UTF-8"):
        load_prompt_sets(path)
    with pytest.raises(FileNotFoundError):
        load_prompt_sets(tmp_path / "missing.json")


# --------------------------------------------------------------------------------------------
# Vocabulary: the words attribute swaps use are data
# --------------------------------------------------------------------------------------------

CUSTOM = Vocabulary(("crimson", "teal"), {"cube": "cubes"}, ("desert",))
RICHER = Vocabulary(
    ("crimson", "teal", "amber"), {"cube": "cubes", "cone": "cones"}, ("desert", "snow")
)


def test_default_vocabulary_is_the_shapes_world_vocabulary() -> None:
    """The shipped JSON and shapes_world.vocab must not drift apart (order included)."""
    raw = json.loads(DEFAULT_VOCABULARY_FILE.read_text(encoding="utf-8"))
    assert raw == {
        "colours": list(COLOURS),
        "shapes": SHAPES,
        "backgrounds": list(BACKGROUNDS),
    }
    default = default_vocabulary()
    assert default.colours == tuple(COLOURS)
    assert list(default.shapes.items()) == list(SHAPES.items())
    assert default.backgrounds == BACKGROUNDS
    assert default == load_vocabulary(DEFAULT_VOCABULARY_FILE)


def test_english_number_words_read_every_shapes_world_count() -> None:
    for value, word in SHAPES_NUMBER_WORDS.items():
        assert ENGLISH_NUMBER_WORDS[value] == word
        assert value <= MAX_READ_COUNT
    assert contrastive_prompts("twelve red stars", "counting")[-1] == "fourteen red stars"


def test_none_means_the_default_vocabulary() -> None:
    prompt = "two red circles on a sky background"
    default = default_vocabulary()
    assert attribute_swaps(prompt, vocabulary=default) == attribute_swaps(prompt)
    for rule in ("attributes", "auto"):
        assert contrastive_prompts(prompt, rule, vocabulary=default) == contrastive_prompts(
            prompt, rule
        )


def test_custom_vocabulary_changes_the_swaps() -> None:
    prompt = "a crimson cube on a desert background"
    assert attribute_swaps(prompt, vocabulary=CUSTOM) == ["a teal cube on a desert background"]
    assert contrastive_prompts(prompt, "attributes", vocabulary=CUSTOM) == [
        "a teal cube on a desert background"
    ]
    assert CONTRASTIVE_RULES["color"](prompt, vocabulary=CUSTOM) == [
        "a teal cube on a desert background"
    ]
    # The shapes world's words are not swapped under another vocabulary.
    with pytest.raises(NoContrastivePrompts, match="no colour or shape"):
        attribute_swaps("a red circle on a sky background", vocabulary=CUSTOM)
    with pytest.raises(NoContrastivePrompts):
        attribute_swaps(prompt)


def test_custom_vocabulary_kinds_plurals_articles_and_auto() -> None:
    prompt = "two crimson cubes on a desert background"
    assert attribute_swaps(prompt, vocabulary=RICHER) == [
        "two teal cubes on a desert background",
        "two amber cubes on a desert background",
        "two crimson cones on a desert background",
        "two crimson cubes on a snow background",
    ]
    assert attribute_swaps("a teal cone", ("colour",), vocabulary=RICHER) == [
        "a crimson cone",
        "an amber cone",
    ]
    assert attribute_swaps("A cone", ("shape",), vocabulary=RICHER) == ["A cube"]
    assert contrastive_prompts("two teal cubes", vocabulary=RICHER) == [
        "a teal cube",
        "three teal cubes",
        "four teal cubes",
        "two crimson cubes",
        "two amber cubes",
        "two teal cones",
    ]


def test_load_vocabulary_from_a_file(tmp_path) -> None:
    path = tmp_path / "vocabulary.json"
    data = {"colours": ["crimson", "teal"], "shapes": {"cube": "cubes"}, "backgrounds": ["desert"]}
    path.write_text(json.dumps(data), encoding="utf-8")
    assert load_vocabulary(path) == load_vocabulary(str(path)) == CUSTOM == parse_vocabulary(data)
    assert attribute_swaps("three teal cubes", vocabulary=load_vocabulary(path)) == [
        "three crimson cubes"
    ]


def test_vocabulary_is_frozen_and_hashable() -> None:
    with pytest.raises(AttributeError):
        CUSTOM.colours = ("red",)  # type: ignore[misc]
    with pytest.raises(TypeError):
        CUSTOM.shapes["sphere"] = "spheres"  # type: ignore[index]
    assert hash(CUSTOM) == hash(parse_vocabulary(json.loads(json.dumps(_as_json(CUSTOM)))))
    assert CUSTOM != RICHER
    assert Vocabulary(("teal", "crimson"), {"cube": "cubes"}, ("desert",)) != CUSTOM  # order
    assert CUSTOM.shape_of("cubes") == CUSTOM.shape_of("cube") == "cube"
    assert CUSTOM.shape_of("circle") is None


def _as_json(vocabulary: Vocabulary) -> dict:
    return {
        "colours": list(vocabulary.colours),
        "shapes": dict(vocabulary.shapes),
        "backgrounds": list(vocabulary.backgrounds),
    }


def test_a_colour_may_also_be_a_background() -> None:
    words = Vocabulary(("white", "black"), {"cube": "cubes"}, ("white", "sky"))
    assert attribute_swaps("a white cube on a white background", vocabulary=words) == [
        "a black cube on a white background",
        "a white cube on a sky background",
    ]


_GOOD = '"colours": ["red"], "shapes": {"cube": "cubes"}, "backgrounds": ["sky"]'


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "invalid JSON at line 1 column 1"),
        ('{"colours": ["red"]', "invalid JSON at line 1"),
        ('["red"]', "expected a JSON object with keys colours, shapes, backgrounds, got array"),
        ('{"colours": ["red"], "shapes": {}}', "missing key 'backgrounds'"),
        ("{" + _GOOD + ', "sizes": ["big"]}', "unknown key 'sizes'; expected only: colours"),
        ("{" + _GOOD + ', "colours": ["blue"]}', "duplicate key 'colours'"),
        (
            '{"colours": "red", "shapes": {}, "backgrounds": []}',
            "colours: expected an array of words, got string",
        ),
        (
            '{"colours": [], "shapes": ["cube"], "backgrounds": []}',
            "shapes: expected an object mapping singular to plural, got array",
        ),
        (
            '{"colours": [], "shapes": {}, "backgrounds": {"sky": 1}}',
            "backgrounds: expected an array of words, got object",
        ),
        (
            '{"colours": ["red", 3], "shapes": {}, "backgrounds": []}',
            r"colours\[1\]: expected a word \(string\), got number",
        ),
        (
            '{"colours": ["Red"], "shapes": {}, "backgrounds": []}',
            r"colours\[0\]: expected one lowercase word, got 'Red'",
        ),
        (
            '{"colours": [], "shapes": {}, "backgrounds": ["night sky"]}',
            r"backgrounds\[0\]: expected one lowercase word, got 'night sky'",
        ),
        (
            '{"colours": [""], "shapes": {}, "backgrounds": []}',
            r"colours\[0\]: expected one lowercase word, got ''",
        ),
        (
            '{"colours": ["red", "blue", "red"], "shapes": {}, "backgrounds": []}',
            r"colours\[2\]: 'red' is repeated",
        ),
        (
            '{"colours": [], "shapes": {"cube": "cubes", "cube": "cubez"}, "backgrounds": []}',
            "duplicate key 'cube'",
        ),
        (
            '{"colours": [], "shapes": {"cube": null}, "backgrounds": []}',
            r"shapes\['cube'\]: expected a word \(string\), got null",
        ),
        (
            '{"colours": [], "shapes": {"Cube": "cubes"}, "backgrounds": []}',
            "shapes key: expected one lowercase word, got 'Cube'",
        ),
        (
            '{"colours": [], "shapes": {"box": "cube", "cube": "cubes"}, "backgrounds": []}',
            r"shapes\['box'\]: plural 'cube' already names a shape",
        ),
        (
            '{"colours": [], "shapes": {"cube": "cubes", "die": "cubes"}, "backgrounds": []}',
            r"shapes\['die'\]: plural 'cubes' already names a shape",
        ),
        (
            '{"colours": ["orange"], "shapes": {"orange": "oranges"}, "backgrounds": []}',
            "shapes: 'orange' is also in colours",
        ),
        (
            '{"colours": [], "shapes": {"cube": "cubes"}, "backgrounds": ["cubes"]}',
            "shapes: 'cubes' is also in backgrounds",
        ),
    ],
)
def test_malformed_vocabulary_files_are_refused(tmp_path, content: str, message: str) -> None:
    path = tmp_path / "vocabulary.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message) as info:
        load_vocabulary(path)
    text = str(info.value)
    assert text.startswith(f"{path}: ")
    assert "\n" not in text


def test_vocabulary_file_not_utf8_or_missing(tmp_path) -> None:
    path = tmp_path / "latin1.json"
    path.write_bytes(b'{"colours": ["caf\xe9"], "shapes": {}, "backgrounds": []}')
    with pytest.raises(ValueError, match="not UTF-8"):
        load_vocabulary(path)
    with pytest.raises(FileNotFoundError):
        load_vocabulary(tmp_path / "missing.json")


def test_vocabulary_constructor_validates() -> None:
    with pytest.raises(ValueError, match="colours: expected a list of words, got a single string"):
        Vocabulary("red", {}, ())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"backgrounds\[0\]: expected one lowercase word"):
        Vocabulary((), {}, ("Sky",))


# --------------------------------------------------------------------------------------------
# Binding sets (the default for compositions)
# --------------------------------------------------------------------------------------------


def _world_binding_set(scene) -> set[str]:
    """What the binding rule must produce for a two-kind world scene, built from scenes with the
    world's own grammar (an oracle independent of the rule's string rewriting)."""
    from dataclasses import replace

    from shapes_world.grammar import describe
    from shapes_world.scene import Caption, Group

    def text(groups) -> str:
        return describe(Caption(groups=tuple(groups), background=scene.background))

    a, b = scene.groups
    out = {text([a]), text([b])}
    for index, group in enumerate(scene.groups):
        others = list(scene.groups)
        for shape in SHAPES:
            if shape not in (a.shape, b.shape):
                others[index] = replace(group, shape=shape)
                out.add(text(others))
        for step in (-2, -1, 1, 2):
            if 1 <= group.count + step <= 6:
                others[index] = Group(group.count + step, group.colour, group.shape)
                out.add(text(others))
        for colour in COLOURS:
            if colour != group.colour:
                others[index] = replace(group, colour=colour)
                out.add(text(others))
        others[index] = group
    if a.colour != b.colour:
        out.add(text([replace(a, colour=b.colour), replace(b, colour=a.colour)]))
    out.discard(text([a, b]))
    return out


def test_binding_matches_the_world_oracle_on_random_compositions() -> None:
    import numpy as np

    from shapes_world.grammar import describe
    from shapes_world.sampling import random_scene
    from shapes_world.scene import Caption

    rng = np.random.default_rng(0)
    for _ in range(200):
        scene = random_scene(rng, kinds=2)
        prompt = describe(Caption.of(scene))
        prompts = contrastive_prompts(prompt, "binding")
        assert set(prompts) == _world_binding_set(scene), prompt
        assert len(prompts) == len(set(prompts))
        assert len(prompts) <= 31  # the model contract's 32 prompts: nothing is cut when served


def test_binding_order_puts_object_errors_first() -> None:
    prompt = "a red circle and a blue square on a grass background"
    prompts = contrastive_prompts(prompt, "binding")
    assert prompts[:2] == [
        "a red circle on a grass background",
        "a blue square on a grass background",
    ]
    assert prompts[2] == "a red triangle and a blue square on a grass background"
    assert "a blue circle and a red square on a grass background" in prompts  # colours swapped
    assert "an orange circle and a blue square on a grass background" in prompts  # article fixed


def test_binding_keeps_case_digits_and_context_for_free_form_prompts() -> None:
    prompts = contrastive_prompts("A photo of 2 cats and a dog, at night", "binding")
    assert prompts[:2] == ["A photo of 2 cats, at night", "A photo of a dog, at night"]
    assert "A photo of 4 cats and a dog, at night" in prompts
    assert "A photo of 2 cats and three dogs, at night" in prompts  # each phrase its own style
    assert all(p.startswith("A photo of ") and p.endswith(", at night") for p in prompts)


def test_binding_uses_the_given_vocabulary() -> None:
    words = parse_vocabulary(
        {
            "colours": ["red", "teal"],
            "shapes": {"cat": "cats", "dog": "dogs", "fox": "foxes"},
            "backgrounds": ["sky"],
        }
    )
    prompts = contrastive_prompts("a red cat and a teal dog", "binding", vocabulary=words)
    assert "a red fox and a teal dog" in prompts and "a red cat and a teal fox" in prompts
    assert "a teal cat and a red dog" in prompts
    assert not any("circle" in p or "blue" in p for p in prompts)


def test_binding_not_applicable_raises() -> None:
    with pytest.raises(NoContrastivePrompts, match="composition"):
        contrastive_prompts("three red triangles on a grass background", "binding")
