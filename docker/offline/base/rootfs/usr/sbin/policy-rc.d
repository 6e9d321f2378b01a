#!/bin/sh
# A container has no init system: packages must not try to start their daemons while they
# install (101 = action forbidden), exactly as in Debian's own container images.
exit 101
