# pcproxy container: multi-stage, slim, non-root.
#
#   docker build -t pcproxy .
#   docker run -d --name pcproxy -p 5060:5060/udp -p 5060:5060/tcp \
#       -v pcproxy-data:/var/lib/pcproxy pcproxy
#   docker exec pcproxy pcproxy endpoint new --sip-address sip:ocschat@contoso.com \
#       --pool-fqdn pcpool.contoso.com
#   docker kill -s HUP pcproxy     # reload: table, TLS certificates, log level
#   docker stop pcproxy            # SIGTERM: drain, then exit 0
#
# The endpoint table lives in the volume /var/lib/pcproxy; the configuration
# is /etc/pcproxy/pcproxy.toml (config/container.toml; mount your own over
# it). For the TLS listener on 5061, mount the certificate and key (e.g. at
# /etc/pcproxy/tls) and name them in [tls] with a "tls:0.0.0.0:5061" listener,
# then publish it: -p 5061:5061/tcp.

FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN python -m venv /opt/pcproxy \
 && /opt/pcproxy/bin/pip install --no-cache-dir --upgrade pip \
 && /opt/pcproxy/bin/pip install --no-cache-dir .

FROM python:3.11-slim-bookworm
RUN groupadd --system pcproxy \
 && useradd --system --gid pcproxy --home-dir /var/lib/pcproxy --shell /usr/sbin/nologin pcproxy \
 && mkdir -p /var/lib/pcproxy /etc/pcproxy \
 && chown pcproxy:pcproxy /var/lib/pcproxy
COPY --from=build /opt/pcproxy /opt/pcproxy
COPY config/container.toml /etc/pcproxy/pcproxy.toml
ENV PATH=/opt/pcproxy/bin:$PATH \
    PCPROXY_DB=/var/lib/pcproxy/pcproxy.db \
    PYTHONUNBUFFERED=1
USER pcproxy
WORKDIR /var/lib/pcproxy
VOLUME ["/var/lib/pcproxy"]
# SIP over UDP and TCP; 5061 for the tls: listener once a certificate is configured
EXPOSE 5060/udp 5060/tcp 5061/tcp
# SIGTERM drains (new requests 503, transactions in flight finish within
# [server] drain_timeout); a second SIGTERM exits at once
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=5s --retries=3 \
    CMD ["pcproxy", "ping", "127.0.0.1:5060", "--timeout", "3"]
ENTRYPOINT ["pcproxy"]
CMD ["serve", "--config", "/etc/pcproxy/pcproxy.toml"]
