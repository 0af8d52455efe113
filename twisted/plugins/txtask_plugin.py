"""
twistd plugin: C{twistd txtask --interface package.module}.

Kept tiny: twistd imports every plugin at each start.
"""

from twisted.application.service import ServiceMaker

txtask = ServiceMaker(
    "txtask",
    "txtask.tap",
    "Run a txtask server: one worker process per client connection.",
    "txtask",
)
