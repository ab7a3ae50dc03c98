"""Word lists used by the caption tag parsers (edit them here, nowhere else)."""

from __future__ import annotations


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


# --- Words that end a noun phrase and are never part of a tag -------------------------------

DETERMINERS = _words("""
    a an the this that these those some any each every either neither no all both another other
    others such what which whose who whom where when why how there here
    i me my mine myself you your yours yourself he him his himself she her hers herself it its
    itself we us our ours ourselves they them their theirs themselves one's someone something
    anyone anything everyone everything nobody nothing
""")

# Counts and quantifiers (including collective "a group of", "a pair of") are never tags.
QUANTIFIERS = _words("""
    zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen
    sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety
    hundred hundreds thousand thousands million millions billion billions dozen dozens half
    first second third fourth fifth sixth seventh eighth ninth tenth last
    several many much more most few fewer less least lot lots plenty various multiple numerous
    enough single double pair pairs group groups bunch number variety handful kind kinds
    type types sort sorts
""")

PREPOSITIONS = _words("""
    of in on at by with from to into onto over under above below behind beside besides between
    among amongst near nearby next through throughout across along alongside around against
    during for about after before inside outside toward towards upon within without via like as
    off out up down past beyond underneath beneath amid amidst than atop per despite except
""")

CONJUNCTIONS = _words("""
    and or but nor so yet while whereas because although though if then also plus versus vs
    whether once until unless
""")

AUXILIARIES = _words("""
    be is are was were been being am have has had having do does did done can could will would
    shall should may might must get gets got gotten isn't aren't wasn't weren't don't doesn't
    didn't can't cannot won't
""")

# Verbs common in captions. Both the base form and the 3rd-person "-s" form (generated) split
# phrases; for the second list only the "-s" form does, because the base form is often a noun
# ("a kiss", "a drive"). Verbs that are mostly nouns in captions (show, watch, drink, cover,
# work, paint) are left out, and so are the forms in NOUN_LIKE_VERB_FORMS.
_VERB_BASES = """
    sit stand hold wear pose attend perform eat look smile take make give go come see seem
    become appear arrive celebrate enjoy carry throw speak sing hang lean wait prepare contain
    represent depict overlook surround decorate fill put win lose meet leave relax greet push
    pull travel explore enter grow bring buy sell serve want need know think say tell let keep
    begin try learn teach write read talk include play walk run swim ride sleep climb jump lie lay
    share compete visit gather reach return join help receive shake cheer graze shine unveil
    announce depart admire feed stare gaze hide
"""
_VERB_3SG_ONLY = "fly kiss hug cook drive kick catch float build dance love lead score rest fight show"
_IRREGULAR_VERB_FORMS = """
    sat stood held wore worn took taken made gave given went gone came seen saw shown ran won lost
    met rode ridden built found bought brought caught thought told said sold sent spent kept slept
    fell felt hung led paid laid lain drove driven flew flown grew grown known knew thrown threw
    wrote written ate eaten drank sang sung swam began begun became hit
    going doing being lying dying using tying aging
"""
# Verb forms that are far more often plural nouns in captions ("autumn leaves", "ocean waves").
NOUN_LIKE_VERB_FORMS = _words("leaves waves falls crosses stops")


def _third_person(verb: str) -> str:
    if verb.endswith(("s", "sh", "ch", "x", "z", "o")):
        return verb + "es"
    if verb.endswith("y") and verb[-2:-1] not in "aeiou":
        return verb[:-1] + "ies"
    return verb + "s"


VERBS = (
    _words(_VERB_BASES)
    | frozenset(_third_person(v) for v in _words(_VERB_BASES) | _words(_VERB_3SG_ONLY))
    | _words(_IRREGULAR_VERB_FORMS)
) - NOUN_LIKE_VERB_FORMS

# Words ending in "-ing" that are nouns, not verbs (all other -ing words of 6+ letters split).
ING_NOUNS = _words("""
    building wedding painting drawing clothing ceiling evening morning spring string swing sling
    thing king ring wing sibling dumpling seedling duckling earring railing awning icing frosting
    topping pudding stuffing bedding living dining lighting housing parking meeting offering opening crossing
    landing filling darling starling sterling viking inning lightning warning ending setting
    carving recording dressing seating flooring roofing siding stocking
    wellbeing sapling gosling herring
""")

# Past participles that are nouns (a trailing "-ed" word is otherwise not a head: "man dressed").
ED_NOUNS = _words("""
    hundred kindred bobsled flowerbed seabed riverbed hotbed sickbed infrared sled shed bed
    sacred naked wicked
""")

# Adverbs and intensifiers are skipped without ending the phrase ("a very large dog").
ADVERBS = _words("""
    very really quite rather too just only even still almost nearly extremely newly
    not never always often together away again ever already soon well somewhat slightly fully
    highly freshly
""")
# Words ending in "-ly" (6+ letters) are adverbs unless listed here.
LY_KEEP = _words("""
    family butterfly dragonfly firefly housefly assembly anomaly monopoly supply friendly lovely
    lonely elderly comely homely costly deadly lively orderly chilly
""")

# --- Words that may appear in a phrase but are never its head ------------------------------

BOILERPLATE_HEADS = _words("""
    photo photograph photography image picture pic illustration stock view close-up closeup shot
    snapshot footage video clip clipart vector graphic rendering render screenshot thumbnail
    background
""")

POSITIONAL_HEADS = _words("""
    left right middle top bottom center centre front side foreground distance rear edge corner
""")

# Adjectives that are never heads ("the sky is blue" gives no tag "blue"). "orange" is left out
# because it is also a fruit.
NON_HEAD_ADJECTIVES = _words("""
    red yellow green blue purple pink brown black white gray grey golden silver
    small medium large big tiny huge little giant
    beautiful happy young old new cute pretty sunny cloudy empty full wet dry hot cold warm
    modern vintage ancient traditional famous popular wooden colorful colourful bright dark
    tall long short wide narrow deep high low heavy clean dirty delicious fresh open closed live
""")

# --- Singularisation guards ------------------------------------------------------------------

# Words kept as they are: plural-only nouns, mass nouns and singulars that end in "s".
INVARIANT_NOUNS = _words("""
    clothes pants jeans shorts trousers tights leggings pajamas pyjamas scissors glasses
    sunglasses eyeglasses goggles binoculars tongs pliers tweezers overalls outskirts
    surroundings belongings remains premises headquarters means news series species physics
    mathematics politics economics athletics gymnastics aerobics gas canvas atlas bias alias
    christmas pancreas texas kansas arkansas vegas thomas douglas nicholas pampas tapas chaos
    ethos kudos cosmos pathos rhinoceros lens debris chassis iris tennis mantis pelvis penis
    trellis axis ibis paris data dice media people sheep fish deer aircraft
""")
# Plurals ending in "-us" (other "-us" words are singular: bus, cactus, octopus, virus).
US_PLURALS = _words("menus emus gurus tutus haikus gnus zebus tofus")
# Irregular plurals that do not end in "s" (handed to inflect); any other such word is kept.
IRREGULAR_PLURALS = _words("""
    children teeth feet geese mice lice oxen criteria phenomena alumni bacteria brethren
""")
# Singular nouns ending in "-men" (other "-men" words are plurals of "-man": firemen, women).
MEN_SINGULARS = _words("omen amen specimen ramen hymen semen stamen abdomen regimen")
