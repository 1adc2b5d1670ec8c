"""String-transform family: inputs are letters/digits; difficulty widens the length range."""
from .base import LOWER, Skill, is_word, random_string, register

_DOC = "length uniform in [2, difficulty + 1]"


def _word(rng, d):
    return random_string(rng, LOWER, d)


register(Skill(name="reverse", family="string", description="reverse the characters: reverse abc = cba",
               sample=_word, apply=lambda x: x[::-1], accepts=is_word, difficulty_doc=_DOC))
register(Skill(name="sort", family="string", description="sort the characters: sort cab = abc",
               sample=_word, apply=lambda x: "".join(sorted(x)), accepts=is_word, difficulty_doc=_DOC))
register(Skill(name="upper", family="string", description="uppercase: upper abc = ABC",
               sample=_word, apply=str.upper, accepts=is_word, difficulty_doc=_DOC))
register(Skill(name="rotate", family="string", description="move the first character to the end: rotate abcd = bcda",
               sample=_word, apply=lambda x: x[1:] + x[:1], accepts=is_word, difficulty_doc=_DOC))
