#!/usr/bin/env bash
# Debian packages the test suite runs for real (never mocked), installed only when missing, with
# ONE `apt-get update` for all of them. Groups:
#   test       postgresql (cluster tests run their own initdb/pg_ctl on loopback), unbound (DANE
#              tests run their own validating resolver), fuse3 + libfuse3-3 (power-loss filesystem)
#   container  podman, runc, debootstrap (make container-test builds and runs the image)
# As root it installs what is missing; otherwise it names what is missing and exits 0, and the
# tests that need it fail (or skip outside CI) with a message saying so.
set -euo pipefail
groups=("$@"); [ ${#groups[@]} -gt 0 ] || groups=(test)

missing=()
need() { missing+=("$@"); }
for g in "${groups[@]}"; do
    case "$g" in
    test)
        ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need postgresql
        command -v unbound >/dev/null 2>&1 || [ -x /usr/sbin/unbound ] || need unbound
        command -v fusermount3 >/dev/null 2>&1 || need fuse3
        ldconfig -p 2>/dev/null | grep -q 'libfuse3\.so\.3' || need libfuse3-3
        ;;
    container)
        for tool in podman runc debootstrap; do command -v "$tool" >/dev/null 2>&1 || need "$tool"; done
        ;;
    *) echo "system-deps: unknown group $g (test, container)" >&2; exit 64 ;;
    esac
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" != 0 ]; then
    echo "system-deps: missing Debian packages: ${missing[*]} (as root: apt-get install ${missing[*]})" >&2
    exit 0
fi
echo "system-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq "${missing[@]}"
# The packaged unbound service would hold port 53 on loopback; the tests start their own.
if printf '%s\n' "${missing[@]}" | grep -qx unbound; then
    (systemctl disable --now unbound || service unbound stop) >/dev/null 2>&1 || true
fi
