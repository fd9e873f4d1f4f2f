#!/usr/bin/env bash
# Makes a throwaway PKI for the TLS tests with the openssl CLI, in DIR:
#   ca.pem ca.key          a CA (EC P-256, 2 days)
#   server.pem server.key  signed by it for DNS:localhost and IP:127.0.0.1 (serverAuth)
#   client.pem client.key  signed by it, CN=dagmesh-test-client (clientAuth), for mTLS
#   other-ca.pem           an unrelated CA (a certificate nobody should trust)
#
#   make_certs.sh DIR
set -euo pipefail
dir="${1:?usage: make_certs.sh DIR}"
mkdir -p "$dir"
cd "$dir"
ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)

ca() {  # name CN
  openssl req -x509 "${ec[@]}" -keyout "$1.key" -out "$1.pem" -days 2 -subj "/CN=$2" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    2>/dev/null
}

leaf() {  # name CN extensions
  openssl req "${ec[@]}" -keyout "$1.key" -out "$1.csr" -subj "/CN=$2" 2>/dev/null
  printf '%b' "$3" > "$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -out "$1.pem" \
    -days 2 -extfile "$1.ext" 2>/dev/null
  rm -f "$1.csr" "$1.ext"
}

ca ca "dagmesh test CA"
ca other-ca "unrelated test CA"
leaf server localhost \
  'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n'
leaf client dagmesh-test-client \
  'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n'
chmod 600 ./*.key
