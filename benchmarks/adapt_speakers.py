"""A demo target with a larger adaptation split: the same domain, more unlabelled speakers.

``call_centre_adapt24`` is call_centre with 24 adaptation speakers instead of 6 (1,200 clips
instead of 300) and nothing else changed. The synthesiser draws the splits' speakers in the order
train, dev, test, adapt, each from its own seeded stream, so the train, dev and test clips are the
same audio as call_centre's and the first 6 adaptation speakers are call_centre's 6 (only the name
in the clip ids differs). A transfer onto it asks one question: does the student pass its labels
when it has more target audio to learn them on? The demo domains themselves stay as they are.

    python benchmarks/transfers.py --seeds 0 --transfers acted_studio:call_centre_adapt24
"""
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mifuse_ray.demo.domains import DOMAINS, DomainConfig  # noqa: E402
from heldout import HELDOUT_DOMAINS  # noqa: E402

ADAPT_SPEAKERS = (12, 24)


def with_adapt_speakers(domain: DomainConfig, speakers: int) -> DomainConfig:
    """``domain`` with ``speakers`` adaptation speakers (its other splits unchanged)."""
    return dataclasses.replace(domain, name=f"{domain.name}_adapt{speakers}",
                               description=f"{domain.description}; {speakers} adaptation speakers",
                               speakers_per_split={**domain.speakers_per_split, "adapt": speakers})


# the demo's domains and the held-out ones (the effect of more audio is checked on both)
ADAPT_SPEAKER_DOMAINS = {f"{name}_adapt{n}": with_adapt_speakers(domain, n)
                         for name, domain in {**DOMAINS, **HELDOUT_DOMAINS}.items() for n in ADAPT_SPEAKERS}
