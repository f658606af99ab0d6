#!/bin/sh
# Python in the image, whatever the base: a python:3.X-slim base already has it (a shared libpython, venv);
# a bare Debian base (localhost/debian:bookworm-minbase, made by debootstrap) gets Debian's python3.11, its
# shared libpython (the Python backend's stub links it) and venv. Then the virtual environment /opt/hpeft.
set -eu
if ! command -v python3 >/dev/null 2>&1; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv libpython3.11 ca-certificates
    apt-get clean
    rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/apt /var/log/dpkg.log
fi
python3 -m venv /opt/hpeft
