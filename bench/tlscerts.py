#!/usr/bin/env python3
"""Test certificates for the TLS benchmark targets, made at run time with the
openssl command line: a CA and one leaf for `localhost` and 127.0.0.1, both
ECDSA P-256 (signatures ecdsa-with-SHA256), valid for two days.

    python3 bench/tlscerts.py DIR      # writes the files below into DIR

Files:
    ca.pem        the CA certificate (the load tool's --ca)
    ca.key        its key (kept only so the leaf can be re-signed)
    leaf.pem      the server certificate alone (the chain sent: the leaf only;
                  the CA is the client's trust anchor, as with a public CA's root)
    leaf.key      its key, PKCS#8 PEM
    haproxy.pem   leaf.pem + leaf.key in one file, as HAProxy's `crt` wants it

nginx, HAProxy and ringlb are all given the same leaf and key, so every
target signs with the same P-256 key and sends the same one-certificate chain.
"""

from __future__ import annotations

import os
import subprocess
import sys

SERVER_NAME = "localhost"
DAYS = "2"

LEAF_EXT = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


def _run(cmd: list[str]) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()[-800:]}")


def make(outdir: str, openssl: str = "openssl") -> dict:
    """Create the CA, the leaf and the HAProxy bundle in `outdir`; return their paths."""
    os.makedirs(outdir, exist_ok=True)
    p = {k: os.path.join(outdir, f) for k, f in (
        ("ca", "ca.pem"), ("ca_key", "ca.key"), ("cert", "leaf.pem"), ("key", "leaf.key"),
        ("csr", "leaf.csr"), ("ext", "leaf.ext"), ("haproxy", "haproxy.pem"))}
    keygen = [openssl, "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]
    _run(keygen + ["-out", p["ca_key"]])
    _run([openssl, "req", "-x509", "-new", "-key", p["ca_key"], "-sha256", "-days", DAYS,
          "-subj", "/CN=ringlb bench test CA", "-out", p["ca"],
          "-addext", "basicConstraints=critical,CA:TRUE",
          "-addext", "keyUsage=critical,keyCertSign,cRLSign"])
    _run(keygen + ["-out", p["key"]])
    _run([openssl, "req", "-new", "-key", p["key"], "-subj", f"/CN={SERVER_NAME}", "-out", p["csr"]])
    with open(p["ext"], "w") as f:
        f.write(LEAF_EXT)
    _run([openssl, "x509", "-req", "-in", p["csr"], "-CA", p["ca"], "-CAkey", p["ca_key"],
          "-CAcreateserial", "-sha256", "-days", DAYS, "-extfile", p["ext"], "-out", p["cert"]])
    with open(p["haproxy"], "w") as out:
        for k in ("cert", "key"):
            with open(p[k]) as f:
                out.write(f.read())
    # Check the chain the way a client will, before any server uses it.
    _run([openssl, "verify", "-CAfile", p["ca"], "-purpose", "sslserver", p["cert"]])
    for k in ("key", "ca_key", "haproxy"):
        os.chmod(p[k], 0o600)
    return {"ca": p["ca"], "cert": p["cert"], "key": p["key"], "haproxy": p["haproxy"],
            "server_name": SERVER_NAME, "dir": outdir}


def describe(paths: dict, openssl: str = "openssl") -> str:
    """One line about the leaf (subject, key, signature) for SETUP.md."""
    r = subprocess.run([openssl, "x509", "-in", paths["cert"], "-noout", "-subject", "-ext",
                        "subjectAltName", "-text"], capture_output=True, text=True)
    text = r.stdout
    algo = next((ln.split(":", 1)[1].strip() for ln in text.splitlines()
                 if "Signature Algorithm" in ln), "?")
    curve = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if "NIST CURVE" in ln), "?")
    return f"leaf CN={paths['server_name']} (SAN DNS:localhost, IP:127.0.0.1), key EC {curve}, signed {algo} by a test CA"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    made = make(sys.argv[1])
    print(describe(made))
    for k, v in made.items():
        print(f"{k}: {v}")
