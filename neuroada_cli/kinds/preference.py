"""Preference tuning (task.kind=preference): DPO on pairs of a chosen and a rejected completion."""
from __future__ import annotations

PREFERENCE_LOSSES = ("sigmoid", "ipo")  # preference.loss: DPO's sigmoid loss, or IPO's squared loss
