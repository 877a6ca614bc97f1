#!/usr/bin/env bash
# Fetch the Apache Kafka broker and its runtime dependencies from Maven Central into a
# cache folder keyed by version (no tarball: the jars are what the tarball holds).
set -euo pipefail
KAFKA_VERSION=${KAFKA_VERSION:-4.1.2}
LOG4J_VERSION=${LOG4J_VERSION:-2.24.3}
CACHE=${AFC_CACHE:-$HOME/.cache/afc}
libs="$CACHE/kafka/$KAFKA_VERSION/libs"
if [ -f "$libs/.complete" ]; then echo "kafka $KAFKA_VERSION: cached in $libs"; exit 0; fi
command -v java >/dev/null || { echo "error: java not found; install a JDK >= 17 (apt-get install openjdk-17-jdk-headless)" >&2; exit 2; }
command -v mvn >/dev/null || { echo "error: mvn not found; install Maven (apt-get install maven)" >&2; exit 2; }
work="$CACHE/kafka/$KAFKA_VERSION/pom"
mkdir -p "$work" "$libs"
cat > "$work/pom.xml" <<POM
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>dev.afc</groupId><artifactId>kafka-testbed</artifactId><version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>$KAFKA_VERSION</version></dependency>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka-tools</artifactId><version>$KAFKA_VERSION</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId><version>$LOG4J_VERSION</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId><version>$LOG4J_VERSION</version></dependency>
  </dependencies>
</project>
POM
mvn -q -B -f "$work/pom.xml" dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$libs"
touch "$libs/.complete"
echo "kafka $KAFKA_VERSION: $(ls "$libs" | wc -l) jars in $libs"
