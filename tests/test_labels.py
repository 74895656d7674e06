"""Labels and selectors (`hub.fleet._labels`): plain values in, plain values out."""

from __future__ import annotations

import pytest

from hub.fleet import MAX_LABELS, BadLabel, apply_labels, check_labels, parse_label, parse_selector


def test_labels_are_checked() -> None:
    assert check_labels({"site": "berlin", "model": "th-100", "x.y_z": "1.2"}) == {
        "site": "berlin",
        "model": "th-100",
        "x.y_z": "1.2",
    }
    assert check_labels({}) == {}
    assert check_labels({"k" * 63: "v" * 63}) == {"k" * 63: "v" * 63}


@pytest.mark.parametrize(
    "labels",
    [
        {"": "v"},
        {"k": ""},
        {"-k": "v"},
        {"k": "-v"},
        {"k y": "v"},
        {"k": "a,b"},
        {"k": "a=b"},
        {"k=": "v"},
        {"k" * 64: "v"},
        {"k": "v" * 64},
        {"ké": "v"},
        {"k": 1},
        {"k": None},
        ["k", "v"],
        "k=v",
        {f"k{i}": "v" for i in range(MAX_LABELS + 1)},
    ],
)
def test_bad_labels_are_refused(labels: object) -> None:
    with pytest.raises(BadLabel):
        check_labels(labels)


def test_parse_label() -> None:
    assert parse_label("site=berlin") == ("site", "berlin")
    for bad in ("site", "site=", "=berlin", "a=b=c", "site = berlin", ""):
        with pytest.raises(BadLabel):
            parse_label(bad)


def test_apply_labels_removes_then_sets_sorted_and_bounded() -> None:
    labels = {"site": "berlin", "model": "th-100"}
    assert apply_labels(labels, {"site": "paris", "a": "1"}, ["model", "absent"]) == {"a": "1", "site": "paris"}
    assert list(apply_labels({}, {"b": "1", "a": "2"}, [])) == ["a", "b"]
    assert apply_labels(labels, {"site": "x"}, ["site"]) == {"model": "th-100", "site": "x"}  # set wins
    full = {f"k{i}": "v" for i in range(MAX_LABELS)}
    assert apply_labels(full, {"k0": "w"}, []) == {**full, "k0": "w"}  # replacing a value adds none
    with pytest.raises(BadLabel, match=f"at most {MAX_LABELS}"):
        apply_labels(full, {"new": "v"}, [])
    assert len(apply_labels(full, {"new": "v"}, ["k1"])) == MAX_LABELS


@pytest.mark.parametrize(
    ("selector", "labels", "expected"),
    [
        ("site=berlin", {"site": "berlin"}, True),
        ("site=berlin", {"site": "paris"}, False),
        ("site=berlin", {}, False),
        ("site=berlin,model=th-100", {"site": "berlin", "model": "th-100", "x": "y"}, True),
        ("site=berlin,model=th-100", {"site": "berlin"}, False),
        ("site!=berlin", {"site": "paris"}, True),
        ("site!=berlin", {}, True),  # no label: not berlin
        ("site!=berlin", {"site": "berlin"}, False),
        ("beta", {"beta": "yes"}, True),
        ("beta", {"site": "berlin"}, False),
        (" site = berlin , beta ", {"site": "berlin", "beta": "1"}, True),
        ("site!=a,site!=b", {"site": "c"}, True),
        ("site!=a,site!=b", {"site": "b"}, False),
    ],
)
def test_selector_matches(selector: str, labels: dict[str, str], expected: bool) -> None:
    assert parse_selector(selector).matches(labels) is expected


def test_the_longest_selector_is_accepted() -> None:
    longest = ",".join(f" {'k' * 61}{i:02} != {'v' * 63} " for i in range(16))
    assert len(parse_selector(longest).terms) == 16


def test_selector_text_round_trips() -> None:
    assert str(parse_selector(" site = berlin,model!=x ,beta")) == "site=berlin,model!=x,beta"


@pytest.mark.parametrize(
    "selector",
    [
        "",
        " ",
        ",",
        "site=",
        "=berlin",
        "site==berlin",
        "site=a=b",
        "site=berlin,",
        "s!te=x",
        "site=a b",
        None,
        3,
        ",".join(["k=v"] * 17),
        "k=" + "v" * 2000,
        "k," + " " * 5000,
    ],
)
def test_bad_selectors_are_refused(selector: object) -> None:
    with pytest.raises(BadLabel):
        parse_selector(selector)
