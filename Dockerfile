# llm-relay: one standard-library Python file; nothing to pip install.
FROM python:3.12-slim

WORKDIR /app
COPY llm_relay.py config.jsonc /app/

# Run as an unprivileged user.
RUN useradd --system --no-create-home --shell /usr/sbin/nologin relay
USER relay

EXPOSE 8080
# Liveness: /health never touches the upstream.
HEALTHCHECK --interval=30s --timeout=3s \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=2)"]

# SIGTERM (docker stop) drains streams for up to shutdown_grace seconds;
# give docker stop a longer --time than that.
STOPSIGNAL SIGTERM
ENTRYPOINT ["python3", "/app/llm_relay.py"]
CMD ["--config", "/app/config.jsonc"]
