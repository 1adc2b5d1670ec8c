"""The workbook's package.

Importing it makes the process offline by default, before huggingface_hub, transformers,
datasets or trl read their settings: no hub lookups, no dataset downloads, no telemetry.
The default profile needs no network. To load a hub model (``model.base`` or
``synthesize.teacher.model`` given as a hub id), opt in with ``SKILL_EXPERTS_ONLINE=1``; an
explicit ``HF_HUB_OFFLINE=0`` (or any of these variables) set by the user is also respected.
"""
import os

ONLINE_OPT_IN = "SKILL_EXPERTS_ONLINE"
OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY")

if os.environ.get(ONLINE_OPT_IN) != "1":
    for _var in OFFLINE_VARS:
        os.environ.setdefault(_var, "1")
