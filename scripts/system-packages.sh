#!/usr/bin/env bash
# Install the Debian packages that pacs-bridge's tests use, when missing:
# dcmtk (storescu, echoscu, dsrdump, dcmcjpeg, ...), orthanc (a real PACS),
# dicom3tools (dciodvfy), chromium (renders the SR as HTML for the pictures),
# postgresql (a throw-away server for the multi-node tests), nodejs and npm
# (dcmjs reads the SR as OHIF does; tests/node pins it).
# Runs apt-get only if something is missing.
set -euo pipefail
missing=()
command -v storescu >/dev/null 2>&1 && [ -x /usr/bin/storescu ] || missing+=(dcmtk)
[ -x /usr/sbin/Orthanc ] || missing+=(orthanc)
[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing+=(orthanc-dicomweb)
command -v dciodvfy >/dev/null 2>&1 || missing+=(dicom3tools)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)  # Selenium drives the web console tests
command -v openssl >/dev/null 2>&1 || missing+=(openssl)  # certificates for the DICOM TLS tests
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
if [ ${#missing[@]} -eq 0 ]; then
  echo "system packages present: dcmtk, orthanc, dicom3tools, chromium, nodejs, npm"
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
echo "installing Debian packages: ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# The Debian orthanc package starts a system service on 4242/8042; the tests run their own.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet orthanc 2>/dev/null; then
  $SUDO systemctl stop orthanc || true
fi
