"""Generate samples/long_manual.txt: a long technical manual for a fictional machine (CC0).

The manual of the fictional **Tidewater K-40 desalination unit** is about 2.5-3x the
8,192-token context of the embedded model. Nine facts, asked about in questions.jsonl,
are written by hand into chapters at the start, the middle and the end; the rest of the
manual (component descriptions, procedures, inspection tables) is assembled from
hand-written sentence templates with a fixed random seed, so the output is deterministic.

    python samples/make_long_manual.py
"""

from __future__ import annotations

import random
from pathlib import Path

OUT = Path(__file__).resolve().parent / "long_manual.txt"

INTRO = """TIDEWATER K-40 DESALINATION UNIT
Operation and Maintenance Manual, fourth edition

Chapter 1. About this manual

This manual describes the installation, operation, inspection and repair of the Tidewater K-40, a containerised desalination unit that turns sea water into drinking water for islands, research stations and ships at anchor. Read the whole of chapter 2 before the unit is started for the first time. Every procedure in this manual assumes that the operator has the tools listed in the appendix and has been trained on the unit by an authorised instructor.

Chapter 2. The unit and its makers

The K-40 was designed by the engineer Ingrid Solvang, who led the design office of Tidewater Machines from its first sketches to the approval of the prototype. Every unit is assembled and tested at the Tidewater factory in the harbour town of Port Halden, where the company has built pumps and valves for three generations. The first K-40 left the factory after a sea trial of ninety days aboard a supply vessel.

The K-40 produces up to forty cubic metres of fresh water a day from sea water of normal salinity. The high-pressure section is rated for a maximum operating pressure of 18.5 bar; the relief valves open above that pressure and must never be adjusted in the field. The unit draws its power from a three-phase supply and can run unattended for up to two weeks between routine visits.
"""

MIDDLE = """Chapter {n}. Emergency equipment

The emergency coolant valve sits on the left wall of the pump bay, below the main switchboard. Its handle is painted violet so that it can be found at once in poor light; no other handle on the unit has this colour. Turning the handle a quarter turn clockwise floods the high-pressure pump housing with coolant from the reserve tank and stops the pump within four seconds.

The primary intake filter keeps sand, weed and shell out of the feed pumps. Order replacement elements only under the part number KF-2291; elements from other suppliers may fit the housing but do not seal against the upper flange. Keep two spare elements on site at all times.

After every stop that lasts longer than three days, the membranes must be flushed with fresh water before the unit is started again. The flushing cycle must run for 47 minutes without interruption; if it is interrupted, start it again from the beginning. The controller counts the minutes and shows the remaining time on its front panel.
"""

LATE = """Chapter {n}. Warranty and support

Tidewater Machines warrants every K-40 against defects of material and workmanship for seven years from the date of commissioning, provided that the inspections of this manual are carried out and recorded in the logbook. The warranty does not cover membranes, filter elements, or damage caused by running the unit above its rated pressure.

Warranty claims are handled by the customer service manager, Marguerite Osei, at the Tidewater head office. Send her the serial number of the unit, the page of the logbook that records the fault, and photographs of any damaged part. Claims are answered within ten working days.

Chapter {m}. Fault codes

The controller shows a fault code on its front panel when it stops the unit. The most serious codes concern the brine circuit: when the brine pump overheats, the controller displays the code E-719 and shuts down the high-pressure section at once. Do not restart the unit until the brine pump has cooled and its bearings have been checked for wear.
"""

SYSTEMS = [
    "feed pump", "booster pump", "dosing station", "cartridge housing", "pressure vessel", "energy recovery device",
    "brine outlet", "product tank", "chlorination skid", "instrument panel", "air compressor", "sludge drain",
    "sample tap", "flow meter", "conductivity probe", "drain manifold", "ventilation fan", "heat exchanger",
    "sand trap", "backwash pump", "check valve", "isolation valve", "pressure gauge", "cable tray",
]
TOOLS = ["a torque wrench", "a soft mallet", "a feeler gauge", "a multimeter", "a hex key set", "a strap wrench", "a grease gun", "an inspection lamp"]
MATERIALS = ["duplex stainless steel", "glass-reinforced plastic", "bronze", "titanium", "polypropylene", "coated carbon steel"]
FINDINGS = ["corrosion at the welds", "a weeping seal", "loose mounting bolts", "discoloured insulation", "a worn bearing", "scale on the inner wall", "cracked paint", "a blocked drain hole"]
CHECKS = ["vibration", "noise", "temperature", "leakage", "alignment", "tightness of the terminals", "condition of the gaskets", "free movement of the spindle"]
VERBS = ["inspect", "clean", "check", "tighten", "lubricate", "test", "record the readings of", "wipe down"]

TEMPLATES = [
    "The {sys} is made of {mat} and is mounted on rubber feet to keep vibration away from the frame.",
    "Before any work on the {sys}, switch off the unit at the main isolator and lock the isolator with your own padlock.",
    "Every {days} days, {verb} the {sys} and write the result in the logbook.",
    "If the {sys} shows {finding}, note it in the logbook and plan a repair at the next routine visit.",
    "Use {tool} when working on the {sys}; the fasteners are tightened to {torque} newton metres.",
    "During the weekly round, listen to the {sys} and check its {check}.",
    "A spare gasket set for the {sys} is stored in drawer {drawer} of the tool cabinet, under stock number TW-{stock}.",
    "The {sys} should run at {pct} per cent of its rated load in normal service; a higher load points to fouling upstream.",
    "When the {sys} is reassembled, replace every seal that was disturbed, even if it looks undamaged.",
    "The {sys} is fitted with a drain plug at its lowest point; open it slowly, since trapped water may be under pressure.",
    "Record the hours run by the {sys} once a month; the counter is on the instrument rack.",
    "Temperatures above {temp} degrees Celsius at the {sys} mean that the cooling air is restricted.",
    "After a repair of the {sys}, run the unit for one hour at reduced output and watch for {check}.",
    "Operators often ask why the {sys} is painted grey: the colour makes leaks and rust easy to see.",
]


def paragraph(rng: random.Random, sentences: int) -> str:
    out = []
    for _ in range(sentences):
        template = rng.choice(TEMPLATES)
        out.append(template.format(
            sys=rng.choice(SYSTEMS), mat=rng.choice(MATERIALS), days=rng.choice([7, 14, 30, 60, 90, 180]),
            verb=rng.choice(VERBS), finding=rng.choice(FINDINGS), tool=rng.choice(TOOLS), torque=rng.randrange(12, 95),
            check=rng.choice(CHECKS), drawer=rng.randrange(1, 12), stock=rng.randrange(1000, 9999), pct=rng.randrange(55, 85),
            temp=rng.randrange(45, 70),
        ))
    return " ".join(out)


def filler_chapter(rng: random.Random, number: int) -> str:
    focus = rng.sample(SYSTEMS, 3)
    title = f"Chapter {number}. The {focus[0]}, the {focus[1]} and the {focus[2]}"
    paras = [paragraph(rng, rng.randrange(5, 9)) for _ in range(rng.randrange(6, 9))]
    return title + "\n\n" + "\n\n".join(paras) + "\n"


def build() -> str:
    rng = random.Random(40)
    chapters = [INTRO]
    number = 3
    for _ in range(10):
        chapters.append(filler_chapter(rng, number))
        number += 1
    chapters.append(MIDDLE.format(n=number))
    number += 1
    for _ in range(10):
        chapters.append(filler_chapter(rng, number))
        number += 1
    chapters.append(LATE.format(n=number, m=number + 1))
    number += 2
    chapters.append(filler_chapter(rng, number))
    return "\n".join(chapters)


if __name__ == "__main__":
    text = build()
    OUT.write_text(text)
    print(f"wrote {OUT}: {len(text.split())} words")
