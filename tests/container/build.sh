#!/usr/bin/env bash
# Build the mta image with podman, on a machine without Docker and without Docker Hub (issue 19).
#
# 1. podman, runc and debootstrap are installed with apt-get when missing (CI runs as root).
# 2. The Dockerfile's base, debian:bookworm-slim, is made with `debootstrap --variant=minbase`
#    from the Debian mirror apt already uses and imported under that name, so the image tested is
#    the image shipped. The host's extra CA certificates are copied in, else apt/pip inside the
#    build cannot reach the archive and the package index through an intercepting proxy. The base
#    stays in podman's storage, so later runs on the same machine skip this step
#    (`make container-clean` removes it).
# 3. `podman build --format docker` (the OCI format drops HEALTHCHECK) with the host network.
set -euo pipefail
cd "$(dirname "$0")/../.."
export CONTAINERS_CONF="$PWD/tests/container/containers.conf"
IMAGE=${MTA_CONTAINER_IMAGE:-localhost/mta:test}
BASE=docker.io/library/debian:bookworm-slim
# Bump when the recipe below changes: a cached base with another value is made again.
BASE_RECIPE=2

missing=()
for tool in podman runc debootstrap; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
if ((${#missing[@]})); then
    if [ "$(id -u)" != 0 ]; then
        echo "container-test: please install ${missing[*]} (apt-get install ${missing[*]})" >&2
        exit 1
    fi
    apt-get install -y "${missing[@]}" || { apt-get update && apt-get install -y "${missing[@]}"; }
fi

recipe=$(podman image inspect --format '{{ index .Labels "mta.base-recipe" }}' "$BASE" 2>/dev/null || true)
if [ "$recipe" != "$BASE_RECIPE" ]; then
    mirror=""
    if [ -r /etc/apt/sources.list.d/debian.sources ]; then
        mirror=$(awk '$1 == "URIs:" { print $2; exit }' /etc/apt/sources.list.d/debian.sources)
    fi
    if [ -z "$mirror" ] && [ -r /etc/apt/sources.list ]; then
        mirror=$(awk '$1 == "deb" && $2 ~ /^https?:/ { print $2; exit }' /etc/apt/sources.list)
    fi
    mirror=${mirror:-http://deb.debian.org/debian}
    root=$(mktemp -d /var/tmp/mta-base.XXXXXX)
    trap 'rm -rf "$root"' EXIT
    echo "container-test: making $BASE with debootstrap from $mirror"
    t0=$SECONDS
    debootstrap --variant=minbase bookworm "$root" "$mirror" >"$root.log" 2>&1 \
        || { tail -20 "$root.log" >&2; rm -f "$root.log"; exit 1; }
    rm -f "$root.log"
    # Trimmed like debian:bookworm-slim: no package lists, .deb archives, docs, man pages or
    # translations, now and (apt and dpkg settings) after every later apt-get install.
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin
    find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
    rm -rf "$root"/usr/share/man/* "$root"/usr/share/locale/* "$root"/usr/share/info/* "$root"/usr/share/lintian/*
    clean='"rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true";'
    cat >"$root/etc/apt/apt.conf.d/90slim" <<APT
DPkg::Post-Invoke { $clean };
APT::Update::Post-Invoke { $clean };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
Acquire::Languages "none";
APT
    cat >"$root/etc/dpkg/dpkg.cfg.d/90slim" <<'DPKG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
DPKG
    if compgen -G "/usr/local/share/ca-certificates/*" >/dev/null; then
        mkdir -p "$root/usr/local/share/ca-certificates"
        cp -r /usr/local/share/ca-certificates/. "$root/usr/local/share/ca-certificates/"
    fi
    old_base=$(podman image inspect --format '{{.Id}}' "$BASE" 2>/dev/null || true)
    tar --numeric-owner -C "$root" -c . \
        | podman import --quiet --change 'CMD ["bash"]' --change "LABEL mta.base-recipe=$BASE_RECIPE" - "$BASE" >/dev/null
    rm -rf "$root"
    trap - EXIT
    [ -z "$old_base" ] || podman rmi "$old_base" >/dev/null 2>&1 || true
    echo "container-test: base image made in $((SECONDS - t0)) s"
fi

previous=$(podman image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)
t0=$SECONDS
log=$(mktemp /var/tmp/mta-build.XXXXXX.log)
podman build --format docker --network host --pull=never -t "$IMAGE" . >"$log" 2>&1 \
    || { tail -40 "$log" >&2; rm -f "$log"; exit 1; }
rm -f "$log"
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
current=$(podman image inspect --format '{{.Id}}' "$IMAGE")
if [ -n "$previous" ] && [ "$previous" != "$current" ]; then
    podman rmi "$previous" >/dev/null 2>&1 || true  # the image this build replaced (unless in use)
fi
echo "container-test: built $IMAGE in $((SECONDS - t0)) s, image size $((size / 1000000)) MB"
