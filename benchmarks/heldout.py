"""Held-out target domains: never used to choose a fusion or a training setting, only to check
that what was chosen on the demo's own domains still holds on domains nobody tuned on.

Both are built from the same synthesiser with settings unlike any demo domain's (a different
class balance, recording chain, voices and expressiveness); the demo domains stay as they are.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mifuse_ray.demo.domains import DomainConfig  # noqa: E402

HELDOUT_DOMAINS = {
    "meeting_room": DomainConfig(
        name="meeting_room",
        description="far-field meeting recordings: long reverberation, higher voices, slow talkers, sad-heavy",
        expressiveness=0.7, variability=0.14, f0_range_hz=(140, 280), vtl_range=(0.85, 1.0), rate_scale=0.9,
        channel="full", file_format="wav", snr_db_range=(15, 25), rt60_range_s=(0.4, 0.8),
        gain_db_range=(-12, -4), class_weights=(0.3, 0.15, 0.15, 0.4), seed=44),
    "voice_notes": DomainConfig(
        name="voice_notes",
        description="phone voice messages: noisy full band, loud and expressive, angry-heavy",
        expressiveness=0.9, variability=0.2, f0_range_hz=(95, 220), vtl_range=(0.9, 1.15), rate_scale=1.05,
        channel="full", file_format="flac", snr_db_range=(5, 15), gain_db_range=(-2, 4),
        class_weights=(0.2, 0.2, 0.4, 0.2), seed=55),
}
