"""The transcriber's answers, as it writes them and as sampling mangles them, parsed for ACE-Step."""

from acecap.lyrics import INSTRUMENTAL, parse_transcript


def test_the_documented_shape():
    text = (
        "# Languages\nen\n\n# Lyrics\n[Verse]\nI walked along the river\nUnder a paper moon\n\n[Chorus]\nSing it loud\n"
    )
    parsed = parse_transcript(text)
    assert parsed.language == "en"
    assert not parsed.is_instrumental
    assert parsed.lyrics == "[Verse]\nI walked along the river\nUnder a paper moon\n\n[Chorus]\nSing it loud"


def test_chinese_japanese_korean_and_spanish():
    zh = parse_transcript("# Languages\nzh\n\n# Lyrics\n[Verse 1]\n月亮代表我的心\n[Chorus]\n你问我爱你有多深")
    assert (zh.language, zh.lyrics) == ("zh", "[Verse 1]\n月亮代表我的心\n[Chorus]\n你问我爱你有多深")
    assert parse_transcript("# Languages\nJapanese\n\n# Lyrics\n[Verse]\n夜に駆ける").language == "ja"
    assert parse_transcript("# Languages\nko-KR\n\n# Lyrics\n[Verse]\n사랑해").language == "ko"
    assert parse_transcript("# Language\nes, en\n\n# Lyrics\n[Coro]\nDespacito\n").language == "es"
    assert parse_transcript("# Languages\n粤语\n\n# Lyrics\n[Verse]\n海阔天空").language == "yue"


def test_malformed_tags_are_cleaned():
    text = (
        "# Languages\nen\n\n# Lyrics\n(Intro)\n[verse 1\nFirst line\nVerse 2:\nSecond line\n[ PRE CHORUS ]\n"
        "Rising\n**Chorus**\n[Chorus]\nHook line\n[]\n【Bridge】\nBreak it down\n[Outro]\n"
    )
    assert parse_transcript(text).lyrics == (
        "[Intro]\n[Verse 1]\nFirst line\n[Verse 2]\nSecond line\n[Pre-Chorus]\nRising\n[Chorus]\nHook line\n"
        "[Bridge]\nBreak it down"
    )


def test_no_vocals_is_instrumental():
    for text in (
        "# Languages\nunknown\n\n# Lyrics\n[Instrumental]\n",
        "# Languages\nnone\n\n# Lyrics\n\n",
        "# Languages\n\n# Lyrics\n[Intro]\n[Outro]\n",
        "# Lyrics\n(instrumental)",
        "纯音乐",
        "",
    ):
        parsed = parse_transcript(text)
        assert parsed.is_instrumental and parsed.lyrics == INSTRUMENTAL, text
        assert parsed.language == "unknown", text


def test_no_headers_and_no_silent_english():
    parsed = parse_transcript("[Verse]\nLa la la\n")
    assert parsed.language == "unknown"  # never a guess
    assert parsed.lyrics == "[Verse]\nLa la la"
    assert parse_transcript("# Languages\nKlingon\n\n# Lyrics\nQapla").language == "unknown"
