"""The Feed-in-Tariff vocabulary the fit-query questions are written in.

Technologies and their synonyms, places and the real UK postcode areas they cover, the size
bands of the original FIT plan, capacity words and units, and the order of the answer fields.

Size words map to fixed ranges (the bands of the original FIT plan, bounds inclusive):
small -> capacity_max_kw 50; medium -> 50..500; large / big -> capacity_min_kw 500.
"""

from __future__ import annotations

from typing import Any

Fields = dict[str, Any]  # answer fields

TECHNOLOGIES = ("Wind", "Photovoltaic", "Hydro", "Anaerobic digestion", "Micro CHP")

TECHNOLOGY_SYNONYMS: dict[str, str] = {
    "wind": "Wind",
    "turbine": "Wind",
    "turbines": "Wind",
    "wind turbines": "Wind",
    "wind farm": "Wind",
    "wind farms": "Wind",
    "wind power": "Wind",
    "solar": "Photovoltaic",
    "PV": "Photovoltaic",
    "solar PV": "Photovoltaic",
    "photovoltaic": "Photovoltaic",
    "solar panels": "Photovoltaic",
    "solar farms": "Photovoltaic",
    "hydro": "Hydro",
    "hydroelectric": "Hydro",
    "hydropower": "Hydro",
    "water power": "Hydro",
    "AD": "Anaerobic digestion",
    "anaerobic": "Anaerobic digestion",
    "anaerobic digestion": "Anaerobic digestion",
    "biogas": "Anaerobic digestion",
    "CHP": "Micro CHP",
    "micro CHP": "Micro CHP",
    "combined heat and power": "Micro CHP",
}
# Plural synonyms already name the installations, so no noun ("sites") follows them.
NOUN_SYNONYMS = frozenset(
    {"turbines", "wind turbines", "wind farms", "solar panels", "solar farms"}
)

# Real UK postcode areas; answers keep each tuple's order.
PLACES: dict[str, tuple[str, ...]] = {
    "Berkshire": ("RG", "SL"),
    "Berks": ("RG", "SL"),
    "Yorkshire": ("YO", "HU", "DN", "HD", "WF", "LS", "BD"),
    "Yorks": ("YO", "HU", "DN", "HD", "WF", "LS", "BD"),
    "Scotland": tuple("AB DD DG EH FK G HS IV KA KW KY ML PA PH TD ZE".split()),
    "the Highlands": ("IV", "KW", "PH"),
    "Aberdeenshire": ("AB",),
    "Edinburgh": ("EH",),
    "Glasgow": ("G",),
    "Cornwall": ("TR", "PL"),
    "Devon": ("EX", "PL", "TQ"),
    "London": ("E", "EC", "N", "NW", "SE", "SW", "W", "WC"),
    "Wales": ("CF", "LD", "LL", "NP", "SA"),
    "Cardiff": ("CF",),
    "Kent": ("CT", "DA", "ME", "TN"),
    "Norfolk": ("NR",),
    "Suffolk": ("IP",),
    "Essex": ("CM", "CO", "SS"),
    "East Anglia": ("NR", "IP", "CB"),
    "Manchester": ("M",),
    "Greater Manchester": ("M", "BL", "OL", "SK", "WN"),
    "Birmingham": ("B",),
    "Liverpool": ("L",),
    "Leeds": ("LS",),
    "Sheffield": ("S",),
    "Bristol": ("BS",),
    "Somerset": ("BA", "TA"),
    "Dorset": ("BH", "DT"),
    "Wiltshire": ("SN", "SP"),
    "Hampshire": ("SO", "PO"),
    "Sussex": ("BN", "RH"),
    "Surrey": ("GU", "KT"),
    "Oxfordshire": ("OX",),
    "Gloucestershire": ("GL",),
    "Cambridgeshire": ("CB", "PE"),
    "Lincolnshire": ("LN", "PE"),
    "Derbyshire": ("DE",),
    "Nottinghamshire": ("NG",),
    "Leicestershire": ("LE",),
    "Shropshire": ("SY", "TF"),
    "Lancashire": ("PR", "BB", "FY", "LA"),
    "Cumbria": ("CA", "LA"),
    "Northumberland": ("NE",),
    "County Durham": ("DH", "DL"),
    "North East England": ("NE", "SR", "DH", "TS", "DL"),
    "South West England": ("TR", "PL", "EX", "TQ", "TA", "BA", "BS", "DT", "GL"),
    "Northern Ireland": ("BT",),
}
POSTCODE_AREAS: tuple[str, ...] = tuple(sorted({a for areas in PLACES.values() for a in areas}))

# Bands from the original plan: small (<50kW), medium (50-500kW), large (>500kW).
SIZE_CLASSES: dict[str, Fields] = {
    "small": {"capacity_max_kw": 50},
    "small-scale": {"capacity_max_kw": 50},
    "medium": {"capacity_min_kw": 50, "capacity_max_kw": 500},
    "medium-sized": {"capacity_min_kw": 50, "capacity_max_kw": 500},
    "large": {"capacity_min_kw": 500},
    "big": {"capacity_min_kw": 500},
    "large-scale": {"capacity_min_kw": 500},
}

# A word with "{}" is a template around the amount: "5mw and up", "100kw or less".
MIN_WORDS = ("over", "above", "more than", "at least", "greater than", "bigger than", ">",
             "{} and up", "{} or more", "{} plus", "{} and above")
MAX_WORDS = ("under", "below", "less than", "up to", "smaller than", "no more than", "at most",
             "<", "max", "{} or less", "{} and under", "{} or smaller")
KW_UNITS = {  # unit word -> kW per unit
    "kw": 1,
    "kilowatt": 1,
    "kilowatts": 1,
    "mw": 1000,
    "megawatt": 1000,
    "megawatts": 1000,
}

FIELD_ORDER = (
    "query_type",
    "technology",
    "technologies",
    "exclude_technologies",
    "capacity_min_kw",
    "capacity_max_kw",
    "postcode_patterns",
    "fit_id",
    "aggregation",
    "include_regional",
    "include_revenue",
)
