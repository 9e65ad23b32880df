#!/bin/bash
# usage: hsprof.sh ringlb|nginx -> perf record (cpu-clock, 2 workers, 2 backends) of full TLS handshakes; report by symbol
cd /tmp/exp
target/release/ringlb-load echo --listen 127.0.0.1:27012 >/dev/null 2>&1 & E=$!; target/release/ringlb-load echo --listen 127.0.0.1:27013 >/dev/null 2>&1 & E2=$!
if [ $1 = ringlb ]; then
sed -e "s/{ addr = \"127.0.0.1:27012\" }/{ addr = \"127.0.0.1:27012\" }, { addr = \"127.0.0.1:27013\" }/" ringlb-tls.toml > hp.toml
target/release/ringlb run --config hp.toml > r1.log 2>&1 & R=$!; sleep 0.7; P=$R
else
sed -e "s/server 127.0.0.1:27012;/server 127.0.0.1:27012; server 127.0.0.1:27013;/" nginx-tls.conf > ngw.conf
nginx -p /tmp/exp/ngt -c /tmp/exp/ngw.conf -e /tmp/exp/ngt/error.log -g 'daemon off;' & R=$!; sleep 0.7; P=$(pgrep -P $R | paste -sd,)
fi
perf record -q -g -F 4999 -e cpu-clock -p $P -o prof.$1.data 2>/dev/null & S=$!; sleep 0.3
bench/indep-load/target/release/indep-load handshake --url wss://127.0.0.1:27023/ --tls --ca ./tls/ca.pem --sni localhost --tls-version 1.3 --tls-cipher TLS13_AES_128_GCM_SHA256 --no-tls-resume --total 20000 --concurrency 50 > hs.out 2>&1
kill -INT $S; wait $S
echo "$1: $(head -1 hs.out | cut -c1-60)"
kill $R $E $E2; wait 2>/dev/null
