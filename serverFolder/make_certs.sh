#!/usr/bin/env bash
# A self-signed CA and a server certificate it signs, for TLS on your own machine or a test
# server. (A shared server open to others should use a certificate from your site's CA.)
#
#   serverFolder/make_certs.sh DIR [NAME ...]     # names the certificate is valid for;
#                                                 # default: localhost 127.0.0.1
# Writes DIR/ca.crt, DIR/ca.key, DIR/server.crt, DIR/server.key; refuses to overwrite them.
# nginx serves server.crt/server.key (tls_proxy.py); clients trust ca.crt:
#   export MLFLOW_TRACKING_SERVER_CERT_PATH=DIR/ca.crt
set -euo pipefail
dir=${1:?usage: make_certs.sh DIR [NAME ...]}
shift
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(localhost 127.0.0.1)
for file in ca.crt ca.key server.crt server.key; do
    if [ -e "$dir/$file" ]; then
        echo "make_certs: $dir/$file exists; not overwriting it (pick another DIR or remove it)" >&2
        exit 1
    fi
done
san=""
for name in "${names[@]}"; do
    if [[ $name =~ ^[0-9.]+$ || $name == *:* ]]; then san+="IP:$name,"; else san+="DNS:$name,"; fi
done
mkdir -p "$dir"
umask 077  # the keys are readable by their owner only
openssl req -x509 -newkey rsa:2048 -nodes -days 825 -subj "/CN=mnistflow local CA" \
    -keyout "$dir/ca.key" -out "$dir/ca.crt" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=${names[0]}" \
    -keyout "$dir/server.key" -out "$dir/server.csr" 2>/dev/null
openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
    -days 825 -out "$dir/server.crt" -extfile <(printf '%s\n' \
        "subjectAltName=${san%,}" "basicConstraints=CA:FALSE" "keyUsage=digitalSignature,keyEncipherment" \
        "extendedKeyUsage=serverAuth" "subjectKeyIdentifier=hash" "authorityKeyIdentifier=keyid") 2>/dev/null
rm -f "$dir/server.csr" "$dir/ca.srl"
chmod 644 "$dir/ca.crt" "$dir/server.crt"
echo "CA $dir/ca.crt; certificate $dir/server.crt for ${names[*]}"
