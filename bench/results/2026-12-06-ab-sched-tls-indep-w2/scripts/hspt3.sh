#!/bin/bash
# usage: hsp.sh SHARDS CLIENT(indep|rl) -> plaintext handshakes through ringlb: per-connection CPU by thread, context switches
cd /tmp/exp
target/release/ringlb-load echo --listen 127.0.0.1:27012 >/dev/null 2>&1 & E=$!; target/release/ringlb-load echo --listen 127.0.0.1:27013 >/dev/null 2>&1 & E2=$!
sed -e "s/shards = 2/shards = $1/" -e "s/{ addr = \"127.0.0.1:27012\" }/{ addr = \"127.0.0.1:27012\" }, { addr = \"127.0.0.1:27013\" }/" ringlb-tls.toml > hp.toml
target/release/ringlb run --config hp.toml > r1.log 2>&1 & R=$!; sleep 0.7
snap() { for t in /proc/$R/task/*; do echo "$(cat $t/comm) $(awk '{print $14, $15}' $t/stat) $(awk '/^voluntary_ctxt/{v=$2} /^nonvoluntary_ctxt/{n=$2} END{print v, n}' $t/status)"; done; }
P0=$(awk "{print \$14+\$15}" /proc/$R/stat); snap > s0
if [ $2 = indep ]; then bench/indep-load/target/release/indep-load handshake --url wss://127.0.0.1:27023/ --tls --ca ./tls/ca.pem --sni localhost --tls-version 1.3 --tls-cipher TLS13_AES_128_GCM_SHA256 --no-tls-resume --total 20000 --concurrency 50 > hs.out 2>&1
else target/release/ringlb-load handshake --url wss://127.0.0.1:27023/ --tls --ca ./tls/ca.pem --sni localhost --tls-version 1.3 --tls-cipher TLS13_AES_128_GCM_SHA256 --no-tls-resume --total 20000 --concurrency 50 > hs.out 2>&1; fi
P1=$(awk "{print \$14+\$15}" /proc/$R/stat); snap > s1; echo "process total: $(( (P1-P0)*10000/20000 )) us/conn"
echo "shards=$1 client=$2: $(head -1 hs.out | cut -c1-60)"
paste s0 s1 | awk '{du=$7-$2; ds=$8-$3; dv=$9-$4; dn=$10-$5; if (du+ds>0 || dv>10) printf "  %-18s user %5.1f sys %5.1f us/conn  vol %.2f invol %.2f /conn\n", $1, du*10000/20000, ds*10000/20000, dv/20000, dn/20000}'
kill $R $E $E2; wait 2>/dev/null
