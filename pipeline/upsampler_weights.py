"""Which weights file goes with which named upsampler, for the jobs that name upsamplers.

The learned upsamplers (jbu, anyup) load a weights file; the others take none. A job naming several upsamplers
at once (evaluation, previews) takes `--upsampler-weights PATH` when one learned upsampler is named, and
`--upsampler-weights NAME=PATH` once per learned upsampler otherwise (e.g. `jbu=ckpt/ anyup=anyup_paper.pth`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from pipeline.options import ConfigError

WEIGHTED_UPSAMPLERS = ("jbu", "anyup")  # learned: weights from a file (AnyUp: the published ones by default)
WEIGHTS_HELP = ("weights of the learned upsampler named (jbu: a checkpoint file or folder; anyup: a published .pth or "
                ".safetensors, default the published multi-backbone weights), local, s3:// or (anyup) http(s); "
                "NAME=PATH for each when both jbu and anyup are named")
_NAMED = re.compile(r"^([A-Za-z0-9_]+)=(.+)$")  # NAME=PATH; a path or URL never starts with a bare word and '='


def assign_weights(upsamplers: Sequence[str], weights: Sequence[str] | None, random_init: bool = False
                   ) -> dict[str, str | None]:
    """{upsampler: its weights or None} for the named `upsamplers`; a ConfigError naming the flag to fix for
    weights that fit no named upsampler, an ambiguous bare PATH, or a JBU without weights (unless `random_init`)."""
    learned = [u for u in upsamplers if u in WEIGHTED_UPSAMPLERS]
    out: dict[str, str | None] = {u: None for u in upsamplers}
    for item in weights or ():
        named = _NAMED.match(item)
        name, source = (named.group(1), named.group(2)) if named else (None, item)
        if name is None:
            if not learned:
                raise ConfigError(f"--upsampler-weights {item} given, but none of --upsampler {', '.join(upsamplers)} "
                                  f"takes weights ({', '.join(WEIGHTED_UPSAMPLERS)} do)")
            if len(learned) > 1:
                raise ConfigError(f"--upsampler-weights {item}: {' and '.join(learned)} are both named; say which "
                                  f"one it is for, e.g. --upsampler-weights {learned[0]}={item}")
            name = learned[0]
        if name not in out:
            raise ConfigError(f"--upsampler-weights {item}: {name!r} is not among --upsampler "
                              f"{', '.join(upsamplers)}")
        if name not in WEIGHTED_UPSAMPLERS:
            raise ConfigError(f"--upsampler-weights {item}: the {name} upsampler takes no weights")
        if out[name] is not None:
            raise ConfigError(f"--upsampler-weights: two files for {name} ({out[name]} and {source})")
        out[name] = source
    if "jbu" in out and out["jbu"] is None and not random_init:
        raise ConfigError("--upsampler jbu needs --upsampler-weights (a trained checkpoint, local or s3://), or "
                          "--random-init for an untrained stack")
    return out
