// A producer we did not write (Kafka's Java client), for tests/test_hostile_wire.py.
//
//   java -cp 'infra/kafka/target/libs/*' tests/java/TxnProducer.java BOOTSTRAP < script
//
// The script on stdin is sections, each a line "@MODE TOPIC PARTITION [TIMEOUT_MS]" followed by
// "key|value" lines (a key "-" is a null key), sent to TOPIC/PARTITION in order:
//   @abort       one transaction, aborted once every record is acknowledged
//   @commit      one transaction, committed
//   @open        a transaction left open: the process ends without committing it (the broker
//                aborts it after transaction.timeout.ms: TIMEOUT_MS, default 10 s); must be the
//                last section
//   @idempotent  an idempotent, non-transactional producer (acks=all)
// It prints "sent MODE N" per section.
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.List;
import java.util.Properties;
import java.util.UUID;
import java.util.concurrent.Future;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.clients.producer.RecordMetadata;
import org.apache.kafka.common.serialization.ByteArraySerializer;

public class TxnProducer {
    public static void main(String[] args) throws Exception {
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        List<String[]> heads = new ArrayList<>();
        List<List<String>> bodies = new ArrayList<>();
        for (String line; (line = in.readLine()) != null; ) {
            if (line.startsWith("@")) {
                heads.add(line.substring(1).split(" "));
                bodies.add(new ArrayList<>());
            } else if (!line.isEmpty()) {
                bodies.get(bodies.size() - 1).add(line);
            }
        }
        for (int s = 0; s < heads.size(); s++) {
            String mode = heads.get(s)[0], topic = heads.get(s)[1];
            int partition = Integer.parseInt(heads.get(s)[2]);
            boolean txn = !mode.equals("idempotent");
            Properties p = new Properties();
            p.put("bootstrap.servers", args[0]);
            p.put("key.serializer", ByteArraySerializer.class.getName());
            p.put("value.serializer", ByteArraySerializer.class.getName());
            p.put("acks", "all");
            p.put("enable.idempotence", "true");
            if (txn) {
                p.put("transactional.id", "fmstream-hostile-" + UUID.randomUUID());
                p.put("transaction.timeout.ms", heads.get(s).length > 3 ? heads.get(s)[3] : "10000");
            }
            KafkaProducer<byte[], byte[]> producer = new KafkaProducer<>(p);
            if (txn) {
                producer.initTransactions();
                producer.beginTransaction();
            }
            List<Future<RecordMetadata>> sent = new ArrayList<>();
            for (String line : bodies.get(s)) {
                int bar = line.indexOf('|');
                String k = line.substring(0, bar);
                byte[] key = k.equals("-") ? null : k.getBytes(StandardCharsets.UTF_8);
                byte[] value = line.substring(bar + 1).getBytes(StandardCharsets.UTF_8);
                sent.add(producer.send(new ProducerRecord<>(topic, partition, key, value)));
            }
            producer.flush();
            for (Future<RecordMetadata> f : sent) f.get();
            if (mode.equals("abort")) producer.abortTransaction();
            if (mode.equals("commit")) producer.commitTransaction();
            System.out.println("sent " + mode + " " + sent.size());
            System.out.flush();
            if (mode.equals("open")) Runtime.getRuntime().halt(0);  // neither commit nor abort
            producer.close();
        }
    }
}
